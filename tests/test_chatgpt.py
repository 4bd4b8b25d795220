"""ChatGPT logins: Codex's passed through, or one held by the proxy for the SDK and curl."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import httpx
import pytest
import trio
from openai import OpenAI
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.conftest import (
    ProxyServer,
    held_proxy,
    request_body,
    sse_events,
    start_proxy,
    user,
    write_auth,
)
from trioproxy.cli import main as cli_main
from trioproxy.codex_auth import CodexLogin
from trioproxy.config import Settings
from trioproxy.fake import FakeUpstream

CODEX_HEADERS = {"originator": "codex_exec", "session-id": "codex-session"}


def root(server: ProxyServer) -> str:
    return server.base_url.removesuffix("/v1")


def chatgpt_headers(token: str, account: str, **extra: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {token}",
        "chatgpt-account-id": account,
        **CODEX_HEADERS,
        **extra,
    }


@pytest.fixture
async def chatgpt(nursery: trio.Nursery, fake: FakeUpstream) -> ProxyServer:
    return await start_proxy(nursery, fake, chatgpt_upstream=fake.chatgpt_url)


# -- pass-through ------------------------------------------------------------------------------
async def test_store_true_is_refused_before_anything_goes_upstream(chatgpt: ProxyServer) -> None:
    tokens = chatgpt.fake.logins.issue("acct-1")
    async with httpx.AsyncClient(base_url=root(chatgpt), timeout=30) as client:
        reply = await client.post(
            "/backend-api/codex/responses",
            json=request_body("hi", store=True),
            headers=chatgpt_headers(tokens["access_token"], "acct-1"),
        )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "store" and error["type"] == "invalid_request_error"
    assert "store" in error["message"] and error["code"] == "unsupported_parameter"
    assert chatgpt.fake.sockets_opened == 0


async def test_account_id_is_part_of_the_pool_key(chatgpt: ProxyServer) -> None:
    fake = chatgpt.fake
    one, two = fake.logins.issue("acct-1"), fake.logins.issue("acct-2")
    async with httpx.AsyncClient(base_url=root(chatgpt), timeout=30) as client:
        for tokens, account in ((one, "acct-1"), (two, "acct-2"), (one, "acct-1")):
            reply = await client.post(
                "/backend-api/codex/responses",
                json=request_body([user(f"hello {account}")]),  # no store: false is implied
                headers=chatgpt_headers(tokens["access_token"], account),
            )
            assert reply.status_code == 200, reply.text
    # Same session id, two accounts: two sockets; the first account's comes back for turn 3.
    assert fake.sockets_opened == 2
    assert [c.socket for c in fake.creates()] == [1, 2, 1]
    assert all(c.message["store"] is False for c in fake.creates())
    assert [h["chatgpt-account-id"] for h in fake.handshakes] == ["acct-1", "acct-2"]


async def test_backend_refusal_reaches_the_client_as_an_openai_error(chatgpt: ProxyServer) -> None:
    async with httpx.AsyncClient(base_url=root(chatgpt), timeout=30) as client:
        chatgpt.fake.logins.issue("acct-1")  # from now on the fake checks tokens
        reply = await client.post(
            "/backend-api/codex/responses",
            json=request_body("hi"),
            headers=chatgpt_headers("not-a-token-it-issued", "acct-1"),
        )
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_token"


async def test_models_are_relayed_over_http_with_the_query_and_credentials(
    chatgpt: ProxyServer,
) -> None:
    tokens = chatgpt.fake.logins.issue("acct-1")
    async with httpx.AsyncClient(base_url=root(chatgpt), timeout=30) as client:
        reply = await client.get(
            "/backend-api/codex/models?client_version=0.169.0",
            headers=chatgpt_headers(tokens["access_token"], "acct-1"),
        )
        refused = await client.get(
            "/backend-api/codex/models", headers=chatgpt_headers("wrong", "acct-1")
        )
    assert reply.status_code == 200 and reply.json() == {"models": []}
    assert reply.headers["content-type"] == "application/json"
    seen = chatgpt.fake.http_requests[0]
    assert seen.target == "/backend-api/codex/models?client_version=0.169.0"
    assert seen.headers["authorization"] == f"Bearer {tokens['access_token']}"
    assert seen.headers["chatgpt-account-id"] == "acct-1"
    assert seen.headers["originator"] == "codex_exec"
    assert refused.status_code == 401  # the backend's answer, status and body, relayed


async def test_models_relay_reports_an_unreachable_upstream(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    with trio.socket.socket() as sock:  # a port bound and kept, nobody listening: refused
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = await start_proxy(
            nursery, fake, chatgpt_upstream=f"ws://127.0.0.1:{port}/backend-api/codex/responses"
        )
        async with httpx.AsyncClient(base_url=root(server), timeout=30) as client:
            reply = await client.get(
                "/backend-api/codex/models", headers=chatgpt_headers("t", "acct-1")
            )
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "upstream_unreachable"


@pytest.mark.parametrize("path", ["/v1/responses", "/responses", "/backend-api/codex/responses"])
async def test_websocket_upgrade_is_answered_426_at_once(chatgpt: ProxyServer, path: str) -> None:
    url = root(chatgpt).replace("http://", "ws://") + path
    with trio.fail_after(5), pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(url, extra_headers=[(b"authorization", b"Bearer x")]):
            pass
    assert rejected.value.status_code == 426
    body = json.loads(rejected.value.body or b"{}")
    assert body["error"]["code"] == "websocket_not_supported"
    assert chatgpt.fake.sockets_opened == 0


# -- a login held by the proxy ------------------------------------------------------------------
def sdk(server: ProxyServer, key: str, session: str) -> OpenAI:
    return OpenAI(
        base_url=server.base_url,
        api_key=key,
        default_headers={"session-id": session},
        max_retries=0,
        timeout=30,
    )


async def test_sdk_turns_with_an_expired_held_token_share_one_refresh(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    auth = write_auth(tmp_path / "auth.json", fake.logins.auth_json("acct-9", lifetime=-1))
    server = await held_proxy(nursery, fake, auth, api_key="local")
    texts: list[str] = []

    async def one(n: int) -> None:
        client = sdk(server, "local", f"sdk-{n}")
        response = await trio.to_thread.run_sync(
            lambda: client.responses.create(model="gpt-test", input=f"hello {n}")
        )
        texts.append(response.output_text)

    async with trio.open_nursery() as turns:
        for n in range(5):
            turns.start_soon(one, n)
    assert sorted(texts) == [f"You said: hello {n}" for n in range(5)]
    assert len(fake.logins.token_requests) == 1  # five turns, one refresh
    token = json.loads(auth.read_text())["tokens"]["access_token"]
    assert {h["authorization"] for h in fake.handshakes} == {f"Bearer {token}"}
    assert {h["chatgpt-account-id"] for h in fake.handshakes} == {"acct-9"}
    assert {h["originator"] for h in fake.handshakes} == {"codex_cli_rs"}
    assert all(c.message["store"] is False for c in fake.creates())


@pytest.mark.parametrize("lanes", [False, True], ids=["own-socket", "lanes"])
async def test_a_401_makes_the_held_login_refresh_and_the_turn_succeed(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path, lanes: bool
) -> None:
    doc = fake.logins.auth_json("acct-9")
    auth = write_auth(tmp_path / "auth.json", doc)
    server = await held_proxy(nursery, fake, auth, lanes=lanes)
    fake.logins.revoke(doc["tokens"]["access_token"])  # valid-looking, but refused upstream
    async with server.client() as client:
        reply = await client.post(
            "/responses", json=request_body("after 401"), headers={"session-id": "s"}
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["output"][0]["content"][0]["text"] == "You said: after 401"
    assert len(fake.logins.token_requests) == 1
    assert server.proxy.retries["unauthorized"] == 1
    assert len(fake.handshakes) == 2  # refused once, then accepted with the new token
    new = json.loads(auth.read_text())["tokens"]["access_token"]
    assert fake.handshakes[1]["authorization"] == f"Bearer {new}"


async def test_a_token_codex_already_refreshed_is_read_back_instead_of_refreshing(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    doc = fake.logins.auth_json("acct-9")
    auth = write_auth(tmp_path / "auth.json", doc)
    server = await held_proxy(nursery, fake, auth)
    # Codex refreshed meanwhile: the proxy's token is revoked, the file holds the new one.
    fake.logins.revoke(doc["tokens"]["access_token"])
    write_auth(auth, fake.logins.auth_json("acct-9"))
    async with server.client() as client:
        reply = await client.post("/responses", json=request_body("hi"))
    assert reply.status_code == 200, reply.text
    assert fake.logins.token_requests == []  # refreshing a rotated token would have failed


async def test_a_dead_refresh_token_is_a_clear_502_not_a_hang(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    doc = fake.logins.auth_json("acct-9", lifetime=-1)
    fake.logins.used_refresh.add(doc["tokens"]["refresh_token"])  # used up elsewhere
    server = await held_proxy(nursery, fake, write_auth(tmp_path / "auth.json", doc))
    async with server.client() as client:
        reply = await client.post("/responses", json=request_body("hi"))
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert error["code"] == "upstream_login_failed"
    assert "already used" in error["message"] and "codex login" in error["message"]
    assert fake.sockets_opened == 0


async def test_held_login_needs_the_local_key_when_one_is_set(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    auth = write_auth(tmp_path / "auth.json", fake.logins.auth_json("acct-9"))
    server = await held_proxy(nursery, fake, auth, api_key="local-key")
    async with server.client() as client:
        missing = await client.post("/responses", json=request_body("hi"))
        wrong = await client.post(
            "/responses", json=request_body("hi"), headers={"authorization": "Bearer nope"}
        )
        right = await client.post(
            "/responses", json=request_body("hi"), headers={"authorization": "Bearer local-key"}
        )
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200
    assert fake.sockets_opened == 1
    assert "local-key" not in json.dumps(fake.handshakes)


async def test_no_token_reaches_a_log_line(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    doc = fake.logins.auth_json("acct-9", lifetime=-1)
    auth = write_auth(tmp_path / "auth.json", doc)
    server = await held_proxy(nursery, fake, auth)
    async with server.client() as client:
        reply = await client.post("/responses", json=request_body("hi"))
    assert reply.status_code == 200
    secrets = [*doc["tokens"].values(), *json.loads(auth.read_text())["tokens"].values()]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "refreshed the ChatGPT access token" in logged
    for secret in secrets:
        if secret != "acct-9":
            assert secret not in logged


def test_a_held_login_on_a_public_address_needs_a_key() -> None:
    with pytest.raises(ValueError, match="api-key"):
        Settings(host="0.0.0.0", codex_auth="/x/auth.json")
    Settings(host="0.0.0.0", codex_auth="/x/auth.json", api_key="k")
    Settings(host="::1", codex_auth="/x/auth.json")


def test_serve_refuses_to_start_on_a_bad_login(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["serve", "--codex-auth", str(tmp_path / "missing.json")]) == 2
    assert "codex login" in capsys.readouterr().err
    key_only = write_auth(tmp_path / "auth.json", {"OPENAI_API_KEY": "sk-x", "tokens": None})
    assert cli_main(["serve", "--codex-auth", str(key_only)]) == 2
    assert "API key" in capsys.readouterr().err
    assert cli_main(["serve", "--host", "0.0.0.0", "--codex-auth", str(key_only)]) == 2
    assert "--api-key" in capsys.readouterr().err


# -- the documented quickstarts, run as written ------------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs" / "codex.md"
README = DOCS.parents[1] / "README.md"


def block(path: Path, name: str) -> str:
    text = path.read_text()
    start = text.index(f"<!-- tested: {name} -->\n```")
    start = text.index("\n", text.index("```", start)) + 1
    return text[start : text.index("```", start)]


def test_readme_shows_the_codex_config_the_codex_tests_run() -> None:
    assert block(README, "api-key") == block(DOCS, "api-key")


async def test_held_login_quickstarts_work_as_written(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    auth = write_auth(tmp_path / "auth.json", fake.logins.auth_json("acct-docs"))
    server = await held_proxy(nursery, fake, auth)
    here = root(server)
    sdk_code = block(DOCS, "held-sdk").replace("http://127.0.0.1:8787", here)
    curl = block(DOCS, "held-curl").replace("http://127.0.0.1:8787", here)
    python = str(Path(sys.executable))
    sdk_run = await trio.run_process(
        [python, "-c", sdk_code], capture_stdout=True, capture_stderr=True, check=False
    )
    assert sdk_run.returncode == 0, sdk_run.stderr.decode()
    assert sdk_run.stdout.decode().strip() == "You said: hello"
    curl_run = await trio.run_process(
        ["bash", "-c", curl],
        env={**os.environ, "LOCAL_KEY": "ignored-on-loopback"},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert curl_run.returncode == 0, curl_run.stderr.decode()
    events = sse_events(curl_run.stdout.decode())
    assert events[-1][0] == "response.completed"
    assert {h["chatgpt-account-id"] for h in fake.handshakes} == {"acct-docs"}
    assert all(c.message["instructions"] == "Be brief." for c in fake.creates())


async def test_compaction_goes_to_the_codex_backend_with_the_right_credentials(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    body = request_body([user("one"), user("two")])
    passed = await start_proxy(nursery, fake, chatgpt_upstream=fake.chatgpt_url)
    tokens = fake.logins.issue("acct-1")
    async with httpx.AsyncClient(base_url=root(passed), timeout=30) as client:
        reply = await client.post(
            "/backend-api/codex/responses/compact",
            json=body,
            headers=chatgpt_headers(tokens["access_token"], "acct-1"),
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["output"][-1]["type"] == "compaction"
    assert fake.http_requests[-1].target == "/backend-api/codex/responses/compact"

    auth = write_auth(tmp_path / "auth.json", fake.logins.auth_json("acct-held", lifetime=-1))
    held = await held_proxy(nursery, fake, auth, api_key="local")
    async with held.client() as client:
        reply = await client.post(
            "/responses/compact", json=body, headers={"authorization": "Bearer local"}
        )
    assert reply.status_code == 200, reply.text
    seen = fake.http_requests[-1]
    assert seen.target == "/backend-api/codex/responses/compact"
    token = json.loads(auth.read_text())["tokens"]["access_token"]  # refreshed first
    assert seen.headers["authorization"] == f"Bearer {token}"
    assert seen.headers["chatgpt-account-id"] == "acct-held"
    assert "openai-beta" not in seen.headers  # the WebSocket flag is for sockets only


@pytest.mark.parametrize("lanes", [False, True], ids=["own-socket", "lanes"])
async def test_a_pooled_socket_whose_token_lapsed_is_replaced_after_one_refresh(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path, lanes: bool
) -> None:
    doc = fake.logins.auth_json("acct-9")
    auth = write_auth(tmp_path / "auth.json", doc)
    server = await held_proxy(nursery, fake, auth, lanes=lanes)
    async with server.client(headers={"session-id": "s"}) as client:
        first = await client.post("/responses", json=request_body([user("one")]))
        assert first.status_code == 200 and server.registry.idle == 1
        # The token is revoked upstream while the session's socket sits in the pool.
        fake.logins.revoke(doc["tokens"]["access_token"])
        history = [user("one"), *first.json()["output"], user("two")]
        second = await client.post("/responses", json=request_body(history))
    assert second.status_code == 200, second.text
    assert second.json()["output"][0]["content"][0]["text"] == "You said: two"
    assert len(fake.logins.token_requests) == 1
    assert server.proxy.retries == {"unauthorized": 1}
    new = json.loads(auth.read_text())["tokens"]["access_token"]
    assert [h["authorization"] for h in fake.handshakes][-1] == f"Bearer {new}"
    last = fake.creates()[-1]
    assert last.socket == 2 and "previous_response_id" not in last.message  # full input


async def test_two_processes_sharing_the_file_spend_the_refresh_token_once(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    # Two logins on one file stand for two hypercorn workers: each has its own lock, the
    # directory lock is what they share.
    auth = write_auth(tmp_path / "auth.json", fake.logins.auth_json("acct-9", lifetime=-1))
    workers = [CodexLogin(auth, fake.token_url) for _ in range(2)]
    tokens: list[str] = []

    async def use(login: CodexLogin) -> None:
        tokens.append(await login.access_token())

    async with trio.open_nursery() as nursery:
        for login in workers:
            nursery.start_soon(use, login)
    assert len(fake.logins.token_requests) == 1
    assert tokens[0] == tokens[1] == json.loads(auth.read_text())["tokens"]["access_token"]


async def test_a_dead_refresh_token_is_not_asked_about_again_until_the_file_changes(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    doc = fake.logins.auth_json("acct-9", lifetime=-1)
    fake.logins.used_refresh.add(doc["tokens"]["refresh_token"])
    auth = write_auth(tmp_path / "auth.json", doc)
    server = await held_proxy(nursery, fake, auth)
    async with server.client() as client:
        for _ in range(3):
            reply = await client.post("/responses", json=request_body("hi"))
            assert reply.status_code == 502
        assert len(fake.logins.token_requests) == 1  # asked once, not once per turn
        write_auth(auth, fake.logins.auth_json("acct-9"))  # `codex login` again
        reply = await client.post("/responses", json=request_body("hi"))
    assert reply.status_code == 200, reply.text
    assert len(fake.logins.token_requests) == 1


async def test_the_chatgpt_routes_can_be_turned_off(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """An operator who serves only API keys closes the pass-through to the Codex backend."""
    server = await start_proxy(
        nursery, fake, chatgpt_upstream=fake.chatgpt_url, chatgpt_routes=False
    )
    root = server.base_url.removesuffix("/v1")
    auth = fake.logins.auth_json("acct-1")["tokens"]["access_token"]
    async with httpx.AsyncClient(base_url=root, timeout=30) as client:
        turn = await client.post(
            "/backend-api/codex/responses",
            json={"model": "m", "input": "x", "store": False},
            headers=chatgpt_headers(auth, "acct-1"),
        )
        models = await client.get("/backend-api/codex/models", headers=chatgpt_headers(auth, "a"))
    assert turn.status_code == models.status_code == 404
    assert turn.json()["error"]["code"] == "not_found"
    assert fake.received == [] and fake.http_requests == []
