"""Managed mode: proxy keys, scopes and channels, and the isolation between scopes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import ProxyServer, nothing_left, request_body, user
from trioproxy import managed
from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.cli import main as cli_main
from trioproxy.config import Settings
from trioproxy.errors import ApiError
from trioproxy.fake import FakeUpstream
from trioproxy.managed import Managed, Ownership

UPSTREAM_SECRET = "sk-upstream-channel-secret"
KEY_A, KEY_B = "tp-team-a-key", "tp-team-b-key"


def config_text(upstream: str) -> str:
    return f"""
[server]
idle_ttl = 600
max_sockets = 50

[channels.main]
upstream = "{upstream}"
api_key_env = "CHANNEL_SECRET"
headers = {{ "openai-project" = "proj_test" }}

[channels.spare]
upstream = "{upstream}"
api_key_env = "CHANNEL_SECRET"

[keys.team-a]
sha256 = "{managed.hash_key(KEY_A)}"
scope = "team-a"
channels = ["main"]

[keys.team-b]
sha256 = "{managed.hash_key(KEY_B)}"
scope = "team-b"
channels = ["main", "spare"]
"""


ENV = {"CHANNEL_SECRET": UPSTREAM_SECRET}


# -- the config ------------------------------------------------------------------------------------
def test_config_file_with_environment_on_top(tmp_path: Path) -> None:
    path = tmp_path / "trioproxy.toml"
    path.write_text(config_text("ws://127.0.0.1:1/v1/responses"))
    env = {**ENV, "TRIOPROXY_KEY_TEAM_A_SCOPE": "team-a2", "TRIOPROXY_IDLE_TTL": "900"}
    server, keys = managed.load(str(path), env)
    assert keys is not None
    assert Settings.from_env(env, base=server).idle_ttl == 900  # env wins over the file
    assert Settings.from_env({}, base=server).max_sockets == 50
    scopes = {key.name: key.scope for key in keys.keys}
    assert scopes == {"team-a": "team-a2", "team-b": "team-b"}
    assert keys.channels["main"].secret == UPSTREAM_SECRET
    assert UPSTREAM_SECRET not in repr(keys)  # secrets stay out of reprs, hence out of logs


def test_config_entirely_from_the_environment() -> None:
    env = {
        "SECRET_VAR": "sk-x",
        "TRIOPROXY_CHANNEL_OPENAI_UPSTREAM": "wss://api.openai.com/v1/responses",
        "TRIOPROXY_CHANNEL_OPENAI_API_KEY_ENV": "SECRET_VAR",
        "TRIOPROXY_KEY_CI_SHA256": managed.hash_key("k"),
        "TRIOPROXY_KEY_CI_SCOPE": "ci",
        "TRIOPROXY_KEY_CI_CHANNELS": "openai",
    }
    _, keys = managed.load(None, env)
    assert keys is not None and keys.keys[0].scope == "ci"
    assert keys.channels["openai"].secret == "sk-x"


@pytest.mark.parametrize(
    ("patch", "says"),
    [
        ({"server": "[server]\nnot_a_setting = 1\n"}, "unknown settings: not_a_setting"),
        ({"server": "[server]\nport = 'eighty'\n"}, "is not a int"),
        ({"secret": ""}, "is empty"),
        ({"sha": "abc"}, "64 hex digits"),
        ({"channels": '["nowhere"]'}, "no such channel: nowhere"),
        ({"toml": "this is = = not toml"}, "not valid TOML"),
    ],
)
def test_config_errors_name_the_entry(tmp_path: Path, patch: dict[str, str], says: str) -> None:
    text = config_text("ws://h/v1/responses")
    if "server" in patch:
        text = text.replace("[server]\nidle_ttl = 600\nmax_sockets = 50\n", patch["server"])
    if "sha" in patch:
        text = text.replace(managed.hash_key(KEY_A), patch["sha"])
    if "channels" in patch:
        text = text.replace('channels = ["main"]', f"channels = {patch['channels']}")
    if "toml" in patch:
        text = patch["toml"]
    path = tmp_path / "c.toml"
    path.write_text(text)
    env = {"CHANNEL_SECRET": patch.get("secret", UPSTREAM_SECRET)}
    with pytest.raises(ValueError, match=says):  # ConfigError, or Settings' own check
        server, _ = managed.load(str(path), env)
        Settings.from_env({}, base=server)


def test_keys_are_found_by_digest_and_channels_checked() -> None:
    _, keys = managed.load(None, _env_config())
    assert keys is not None
    key, channel = keys.authenticate([("authorization", f"Bearer {KEY_B}")])
    assert (key.scope, channel.name) == ("team-b", "main")
    _, spare = keys.authenticate(
        [("authorization", f"Bearer {KEY_B}"), ("x-trioproxy-channel", "spare")]
    )
    assert spare.name == "spare"
    with pytest.raises(ApiError) as denied:
        keys.authenticate([("authorization", f"Bearer {KEY_A}"), ("x-trioproxy-channel", "spare")])
    assert denied.value.status == 403
    for headers in ([], [("authorization", "Bearer nope")], [("authorization", KEY_A + "x")]):
        with pytest.raises(ApiError) as refused:
            keys.authenticate(headers)
        assert refused.value.status == 401 and refused.value.code == "invalid_api_key"


def test_ownership_is_bounded_and_per_scope() -> None:
    owners = Ownership(size=2)
    owners.record("r1", "a")
    owners.record("r2", "b")
    assert owners.foreign("r1", "b") and not owners.foreign("r1", "a")
    owners.record("r3", "a")  # r1 falls out
    assert not owners.foreign("r1", "b") and not owners.foreign("unknown", "b")


def _env_config() -> dict[str, str]:
    return {
        **ENV,
        "TRIOPROXY_CHANNEL_MAIN_UPSTREAM": "ws://h/v1/responses",
        "TRIOPROXY_CHANNEL_MAIN_API_KEY_ENV": "CHANNEL_SECRET",
        "TRIOPROXY_CHANNEL_SPARE_UPSTREAM": "ws://h/v1/responses",
        "TRIOPROXY_CHANNEL_SPARE_API_KEY_ENV": "CHANNEL_SECRET",
        "TRIOPROXY_KEY_TEAM_A_SHA256": managed.hash_key(KEY_A),
        "TRIOPROXY_KEY_TEAM_A_SCOPE": "team-a",
        "TRIOPROXY_KEY_TEAM_A_CHANNELS": "main",
        "TRIOPROXY_KEY_TEAM_B_SHA256": managed.hash_key(KEY_B),
        "TRIOPROXY_KEY_TEAM_B_SCOPE": "team-b",
        "TRIOPROXY_KEY_TEAM_B_CHANNELS": "main,spare",
    }


# -- through the proxy -----------------------------------------------------------------------------
@pytest.fixture
async def gateway(nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path) -> ProxyServer:
    return await gateway_for(nursery, fake, tmp_path)


async def gateway_for(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path, upstream: str | None = None
) -> ProxyServer:
    """A managed proxy with this module's two keys and channels, against `fake`."""
    path = tmp_path / "trioproxy.toml"
    path.write_text(config_text(upstream or fake.url))
    server_values, keys = managed.load(str(path), ENV)
    assert keys is not None
    return await start_managed(nursery, fake, keys, **server_values)


async def start_managed(
    nursery: trio.Nursery, fake: FakeUpstream, keys: Managed, **values: Any
) -> ProxyServer:
    from functools import partial

    from hypercorn.trio import serve as hypercorn_serve

    app = create_app(Settings(upstream=fake.url, **values), managed=keys)
    binds = await nursery.start(partial(hypercorn_serve, app, hypercorn_config("127.0.0.1", 0)))
    return ProxyServer(binds[0].rstrip("/") + "/v1", app, fake)


async def ask(
    client: httpx.AsyncClient, key: str, body: dict[str, Any], session: str = "shared"
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "session-id": session}
    return await client.post("/responses", json=body, headers=headers)


async def test_two_scopes_with_one_session_id_never_share_a_socket_or_a_chain(
    gateway: ProxyServer,
) -> None:
    fake = gateway.fake
    async with gateway.client() as client:
        a1 = await ask(client, KEY_A, request_body([user("a one")]))
        b1 = await ask(client, KEY_B, request_body([user("b one")]))
        assert a1.status_code == b1.status_code == 200
        a_history = [user("a one"), *a1.json()["output"], user("a two")]
        a2 = await ask(client, KEY_A, request_body(a_history))
        assert a2.status_code == 200
        # Team B tries team A's response id: refused as if it did not exist, nothing sent.
        sent = len(fake.received)
        stolen = await ask(
            client, KEY_B, request_body([user("b?")], previous_response_id=a1.json()["id"])
        )
        assert stolen.status_code == 400
        assert stolen.json()["error"]["code"] == "previous_response_not_found"
        assert len(fake.received) == sent
        # Team A may chain from its own.
        own = await ask(
            client, KEY_A, request_body([user("a3")], previous_response_id=a2.json()["id"])
        )
        assert own.status_code == 200
    creates = fake.creates()
    assert fake.sockets_opened == 2 and gateway.registry.pooled == 2
    assert [c.socket for c in creates] == [1, 2, 1, 1]  # same session id, one socket a scope
    assert creates[2].message["previous_response_id"] == a1.json()["id"]  # A's suffix turn
    for handshake in fake.handshakes:
        assert handshake["authorization"] == f"Bearer {UPSTREAM_SECRET}"
        assert handshake["openai-project"] == "proj_test"
    assert KEY_A not in json.dumps(fake.handshakes) and KEY_B not in json.dumps(fake.handshakes)


async def test_requests_without_a_proxy_key_are_refused_everywhere(gateway: ProxyServer) -> None:
    root = gateway.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(base_url=root, timeout=30) as client:
        upstream_key = await client.post(
            "/v1/responses",
            json=request_body("x"),
            headers={"authorization": f"Bearer {UPSTREAM_SECRET}"},
        )
        none = await client.post("/v1/responses", json=request_body("x"))
        compact = await client.post("/v1/responses/compact", json=request_body("x"))
        chatgpt = await client.post(
            "/backend-api/codex/responses",
            json=request_body("x"),
            headers={"authorization": f"Bearer {KEY_A}"},
        )
        other_channel = await client.post(
            "/v1/responses",
            json=request_body("x"),
            headers={"authorization": f"Bearer {KEY_A}", "x-trioproxy-channel": "spare"},
        )
    assert upstream_key.status_code == none.status_code == compact.status_code == 401
    assert chatgpt.status_code == 404 and other_channel.status_code == 403
    assert gateway.fake.received == [] and gateway.fake.http_requests == []


async def test_a_managed_key_relays_compaction_with_the_channel_credential(
    gateway: ProxyServer,
) -> None:
    async with gateway.client() as client:
        reply = await client.post(
            "/responses/compact",
            json=request_body([user("x")]),
            headers={"authorization": f"Bearer {KEY_A}"},
        )
    assert reply.status_code == 200, reply.text
    seen = gateway.fake.http_requests[-1]
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"


def test_serve_refuses_a_bad_config_and_hash_key_prints_the_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[keys.x]\nsha256 = 'nope'\nscope = 's'\nchannels = ['c']\n")
    assert cli_main(["serve", "--config", str(bad)]) == 2
    assert "64 hex digits" in capsys.readouterr().err
    assert cli_main(["hash-key", "my-key"]) == 0
    assert capsys.readouterr().out.strip() == managed.hash_key("my-key")


# -- hardening: every route, every header ----------------------------------------------------------
async def test_compaction_refuses_another_scopes_response_id(gateway: ProxyServer) -> None:
    """Compaction carries a response id too: with `store: true` relaying it with the channel's
    key would read another team's conversation. Refused like a turn, nothing sent upstream."""
    async with gateway.client() as client:
        a1 = await ask(client, KEY_A, request_body([user("team a secret")]))
        before = len(gateway.fake.http_requests)
        stolen = await client.post(
            "/responses/compact",
            json=request_body([user("x")], previous_response_id=a1.json()["id"]),
            headers={"authorization": f"Bearer {KEY_B}"},
        )
        own = await client.post(
            "/responses/compact",
            json=request_body([user("x")], previous_response_id=a1.json()["id"]),
            headers={"authorization": f"Bearer {KEY_A}"},
        )
    assert stolen.status_code == 400
    assert stolen.json()["error"]["code"] == "previous_response_not_found"
    assert own.status_code == 200
    assert len(gateway.fake.http_requests) == before + 1  # only team A's went upstream
    await nothing_left(gateway)


async def test_the_channel_decides_billing_headers_and_pins_are_never_doubled(
    gateway: ProxyServer,
) -> None:
    headers = {
        "authorization": f"Bearer {KEY_A}",
        "session-id": "hdr",
        "openai-project": "proj_attacker",
        "openai-organization": "org_attacker",
        "chatgpt-account-id": "acct_attacker",
        "x-forwarded-for": "10.0.0.1",
        "origin": "https://evil.example",
        "x-trioproxy-scope": "team-b",
        "x-custom-billing": "someone-else",
        "x-codex-turn-metadata": "{}",
        "user-agent": "codex_exec/0.169.0",
    }
    async with gateway.client() as client:
        turn = await client.post("/responses", json=request_body([user("x")]), headers=headers)
        compact = await client.post(
            "/responses/compact", json=request_body([user("x")]), headers=headers
        )
    assert turn.status_code == compact.status_code == 200
    handshake = gateway.fake.handshakes[0]
    relayed = gateway.fake.http_requests[-1].headers
    for seen in (handshake, relayed):
        assert seen["openai-project"] == "proj_test"  # the channel's, once
        for name in ("openai-organization", "chatgpt-account-id", "x-forwarded-for", "origin"):
            assert name not in seen, name
        assert "x-trioproxy-scope" not in seen and "x-custom-billing" not in seen
        assert seen["user-agent"] == "codex_exec/0.169.0"
    assert handshake["x-codex-turn-metadata"] == "{}"


async def test_a_managed_client_sees_the_model_not_the_channels_account_or_limits(
    gateway: ProxyServer,
) -> None:
    gateway.fake.api_headers = [
        ("openai-model", "gpt-5-served"),
        ("openai-organization", "org-operator"),
        ("x-ratelimit-remaining-tokens", "123"),
    ]
    async with gateway.client() as client:
        reply = await ask(client, KEY_A, request_body([user("x")]))
    assert reply.status_code == 200
    assert reply.headers["openai-model"] == "gpt-5-served"
    assert "openai-organization" not in reply.headers
    assert "x-ratelimit-remaining-tokens" not in reply.headers


# -- several instances: ids this instance never saw ------------------------------------------------
async def test_an_id_this_instance_never_saw_is_refused_in_managed_mode(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    """Behind a balancer a scope's request may reach an instance that did not make the id it
    chains from (or one restarted since). Fail closed: refused as not found, nothing sent, so
    no scope chains from an id it learnt elsewhere; the client starts the chain again."""
    first = await gateway_for(nursery, fake, tmp_path)
    async with first.client() as client:
        made = await ask(client, KEY_A, request_body([user("on instance one")]))
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = await gateway_for(nursery, fake, second_dir)
    async with second.client() as client:
        sent = len(fake.received)
        chained = await ask(
            client, KEY_A, request_body([user("next")], previous_response_id=made.json()["id"])
        )
        fresh = await ask(client, KEY_A, request_body([user("on instance one"), user("again")]))
    assert chained.status_code == 400
    assert chained.json()["error"]["code"] == "previous_response_not_found"
    assert len(fake.received) == sent + 1  # only the fresh request went upstream
    assert fresh.status_code == 200


async def test_unseen_ids_go_upstream_when_the_operator_allows_them(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "trioproxy.toml"
    path.write_text(config_text(fake.url))
    values, keys = managed.load(str(path), ENV)
    assert keys is not None
    gateway = await start_managed(nursery, fake, keys, **values, refuse_unseen_chains=False)
    async with gateway.client() as client:
        made = await ask(client, KEY_A, request_body([user("stored")], store=True))
        gateway.proxy.ownership = Ownership()  # as after a restart: the id is unseen
        chained = await ask(
            client, KEY_A, request_body([user("next")], previous_response_id=made.json()["id"])
        )
    assert chained.status_code == 200
    assert fake.creates()[-1].message["previous_response_id"] == made.json()["id"]
