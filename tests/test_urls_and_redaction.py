"""Upstream URLs with a query (Azure's `?api-version=`), and secrets kept out of what is shown:
credentials in the upstream URL (start-up line, /healthz) and keys quoted in upstream errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import ConnectionRejected

from tests.conftest import AUTH, ProxyServer, post, request_body, start_proxy, user
from trioproxy import cli, errors, managed, relay
from trioproxy.app import create_app
from trioproxy.config import Settings, redacted_url
from trioproxy.fake import FakeUpstream
from trioproxy.fake.script import Reply
from trioproxy.httpclient import HttpResponse
from trioproxy.targets import http_base, http_url
from trioproxy.wsclient import ClientSocket

AZURE = "wss://example.openai.azure.com/openai/v1/responses?api-version=2025-04-01-preview"
VERSION = "api-version=2025-04-01-preview"
MASKED = (
    "Incorrect API key provided: sk-proj-abc***************************wxyz. "
    "You can find your API key at https://platform.openai.com/account/api-keys."
)
REDACTED = (
    "Incorrect API key provided: sk-***. "
    "You can find your API key at https://platform.openai.com/account/api-keys."
)


# -- http_url ----------------------------------------------------------------------------------
def test_http_url_keeps_the_upstream_query_after_the_path() -> None:
    base = "https://example.openai.azure.com/openai/v1"
    assert http_url(AZURE, "/models") == f"{base}/models?{VERSION}"
    assert http_url(AZURE, "/responses") == f"{base}/responses?{VERSION}"
    assert http_url(AZURE, "/responses/compact") == f"{base}/responses/compact?{VERSION}"


def test_http_url_merges_the_request_query_after_the_upstream_one() -> None:
    expected = f"https://example.openai.azure.com/openai/v1/models?{VERSION}&client_version=1"
    assert http_url(AZURE, "/models", "client_version=1") == expected
    assert http_url(AZURE, "/models", "?client_version=1") == expected


def test_http_url_without_an_upstream_query() -> None:
    assert http_url("wss://api.openai.com/v1/responses", "/models") == (
        "https://api.openai.com/v1/models"
    )
    assert http_url("ws://127.0.0.1:9/v1/responses/", "/models", "a=1") == (
        "http://127.0.0.1:9/v1/models?a=1"
    )
    assert http_url("https://h/p", "/models") == "https://h/p/models"


def test_http_base_keeps_the_query_as_a_query() -> None:
    assert http_base(AZURE) == f"https://example.openai.azure.com/openai/v1?{VERSION}"
    assert http_base("wss://chatgpt.com/backend-api/codex/responses") == (
        "https://chatgpt.com/backend-api/codex"
    )


# -- end to end: an Azure-shaped upstream --------------------------------------------------------
async def test_relayed_calls_keep_the_upstream_query(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, upstream=f"{fake.url}?{VERSION}")
    async with server.client() as client:
        models = await client.get("/models", headers=AUTH)
        assert models.status_code == 200, models.text
        assert fake.http_requests[-1].target == f"/v1/models?{VERSION}"

        own = await client.get("/models?client_version=1", headers=AUTH)
        assert own.status_code == 200, own.text
        assert fake.http_requests[-1].target == f"/v1/models?{VERSION}&client_version=1"

        body = request_body([user("hello")])
        compact = await client.post("/responses/compact", json=body, headers=AUTH)
        assert compact.status_code == 200, compact.text
        assert fake.http_requests[-1].target == f"/v1/responses/compact?{VERSION}"


async def test_turns_open_sockets_on_an_upstream_with_a_query(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, upstream=f"{fake.url}?{VERSION}")
    async with server.client() as client:
        reply = await post(client, request_body([user("hello")], stream=False))
    assert reply.status_code == 200, reply.text
    assert fake.sockets_opened == 1 and fake.http_posts == []


async def test_the_http_fallback_keeps_the_upstream_query(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    fake.websocket_enabled = False
    server = await start_proxy(nursery, fake, upstream=f"{fake.url}?{VERSION}")
    async with server.client() as client:
        reply = await post(client, request_body([user("hello")], stream=False))
    assert reply.status_code == 200, reply.text
    assert fake.http_posts and fake.http_requests[-1].target == f"/v1/responses?{VERSION}"


async def test_health_shows_the_upstream_without_its_key(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, upstream=f"{fake.url}?api-key=sk-secret-1&{VERSION}")
    async with server.client() as client:
        health = (await client.get(server.base_url.removesuffix("/v1") + "/healthz")).json()
    assert health["upstream"] == f"{fake.url}?api-key=***&{VERSION}"
    assert "sk-secret-1" not in json.dumps(health)


# -- redacted_url --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["api-key", "key", "token", "sig", "signature", "secret", "password", "access_token", "code"],
)
def test_redacted_url_hides_secret_parameters(name: str) -> None:
    url = f"wss://h.example/openai/v1/responses?api-version=2025-04-01-preview&{name}=hunter2"
    shown = redacted_url(url)
    assert "hunter2" not in shown
    assert shown == f"wss://h.example/openai/v1/responses?{VERSION}&{name}=***"


def test_redacted_url_matches_names_by_part_and_case() -> None:
    shown = redacted_url("https://h/v1?X-Api-Key=a&AUTHORIZATION=b&sv=2024&passwd=c&SessionToken=d")
    assert (
        shown == "https://h/v1?X-Api-Key=***&AUTHORIZATION=***&sv=2024&passwd=***&SessionToken=***"
    )


def test_redacted_url_hides_userinfo() -> None:
    assert redacted_url("wss://me:hunter2@h.example:8443/v1/responses") == (
        "wss://***@h.example:8443/v1/responses"
    )
    assert redacted_url("https://tok@h/v1") == "https://***@h/v1"


def test_redacted_url_leaves_a_plain_url_alone() -> None:
    for url in (AZURE, "wss://api.openai.com/v1/responses", "ws://127.0.0.1:9/v1/responses"):
        assert redacted_url(url) == url


def test_a_bad_upstream_url_is_refused_without_its_key() -> None:
    with pytest.raises(ValueError) as refused:
        Settings(upstream="ftp://h/v1?api-key=hunter2")
    assert "hunter2" not in str(refused.value)


async def test_the_start_up_line_hides_the_key(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_serve(*args: object, **kwargs: object) -> None:
        return None

    monkeypatch.setattr(cli, "hypercorn_serve", no_serve)
    settings = Settings(upstream=f"{AZURE}&api-key=hunter2")
    with caplog.at_level(logging.INFO, logger="trioproxy"):
        await cli.run_server(settings)
    assert "hunter2" not in caplog.text
    assert f"{VERSION}&api-key=***" in caplog.text


# -- errors.redact -------------------------------------------------------------------------------
def test_redact_masks_a_masked_key_and_keeps_the_sentence() -> None:
    assert errors.redact(MASKED) == REDACTED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("key sk-abcd1234 refused", "key sk-*** refused"),
        ("key sk-proj-AbC_d-9 refused", "key sk-*** refused"),
        ("(sk-proj-abc****wxyz)", "(sk-***)"),
        ("session sess-AbCdEf123456, expired", "session sess-***, expired"),
        ("restricted rk-abcd1234", "restricted rk-***"),
        (
            "header Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig",
            "header Authorization: Bearer ***",
        ),
        ("the task-1234 and desk-lamp stay", "the task-1234 and desk-lamp stay"),
        ("sk-ab is too short to be a key", "sk-ab is too short to be a key"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert errors.redact(text) == expected
    assert errors.redact(expected) == expected


def test_upstream_error_messages_are_redacted() -> None:
    event = {
        "type": "error",
        "status": 401,
        "error": {"code": "invalid_api_key", "message": MASKED},
    }
    assert errors.from_error_event(event).message == REDACTED
    body = orjson.dumps({"error": {"message": MASKED, "type": "invalid_request_error"}})
    refused = errors.from_handshake_rejection(401, body)
    assert (refused.status, refused.message) == (401, REDACTED)
    assert "wxyz" not in errors.upstream_closed(f"code 1008 ({MASKED})").message


# -- end to end: keys quoted by the upstream ------------------------------------------------------
async def test_a_refused_handshake_quoting_the_key_is_redacted(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """The fake's refusals carry a message of their own: a connector refuses instead, with the
    body OpenAI sends; the rest of the way (upstream, proxy, HTTP) is the real one."""
    body = orjson.dumps(
        {"error": {"message": MASKED, "type": "invalid_request_error", "code": "invalid_api_key"}}
    )

    @asynccontextmanager
    async def refusing(url: str, headers: list[tuple[bytes, bytes]]) -> AsyncIterator[ClientSocket]:
        raise ConnectionRejected(401, (), body)
        yield  # pragma: no cover (a generator, never reached)

    server = await start_proxy(nursery, fake, connector=refusing)
    async with server.client() as client:
        reply = await post(client, request_body([user("hello")], stream=False))
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"]["message"] == REDACTED
    assert "wxyz" not in reply.text


MANAGED = """
[channels.main]
upstream = "{upstream}"
api_key_env = "CHANNEL_SECRET"

[keys.team]
sha256 = "{digest}"
scope = "team"
channels = ["main"]
"""


async def managed_proxy(nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path) -> ProxyServer:
    """A managed gateway whose one channel holds `sk-channel-...`; clients send `tp-team`."""
    path = tmp_path / "trioproxy.toml"
    path.write_text(MANAGED.format(upstream=fake.url, digest=managed.hash_key("tp-team")))
    _, keys = managed.load(str(path), {"CHANNEL_SECRET": "sk-channel-secret-wxyz"})
    app = create_app(Settings(upstream=fake.url), managed=keys)
    binds = await nursery.start(partial(hypercorn_serve, app, cli.hypercorn_config("127.0.0.1", 0)))
    return ProxyServer(binds[0].rstrip("/") + "/v1", app, fake)


async def test_a_managed_client_never_sees_the_channel_key(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    server = await managed_proxy(nursery, fake, tmp_path)
    quoted = "Incorrect API key provided: sk-chan***********wxyz. You can find your API key at x."
    fake.queue(Reply.error("invalid_api_key", 401, quoted))
    headers = {"authorization": "Bearer tp-team", "session-id": "s1"}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        body = request_body([user("hello")], stream=False)
        reply = await client.post("/responses", json=body, headers=headers)
    assert reply.status_code == 401, reply.text
    assert "wxyz" not in reply.text and "sk-***" in reply.json()["error"]["message"]


def test_relayed_error_bodies_are_redacted() -> None:
    body = orjson.dumps({"error": {"message": MASKED, "code": "invalid_api_key"}})
    refused = relay._redacted(HttpResponse(401, [], body))
    assert orjson.loads(refused)["error"]["message"] == REDACTED
    fine = HttpResponse(200, [], b'{"id": "sk-proj-abcdef"}')
    assert relay._redacted(fine) == fine.body
