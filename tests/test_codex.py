"""The real Codex CLI (from npm) through the proxy, in every way a Codex user connects.

Each test runs `codex exec` against an in-process proxy whose upstream is the fake, driven by
`fake:` lines in the prompt (see trioproxy/fake/script.py). The fake emulates the Codex backend
for the ChatGPT modes: it checks the bearer and `chatgpt-account-id`, enforces `store: false`
and serves a token endpoint, so these tests fail if the proxy sends anything Codex would not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from quart import request

from tests.conftest import ProxyServer, held_proxy, start_proxy, wait_until, write_auth
from trioproxy.fake import FakeUpstream
from trioproxy.fake.server import Received

ROOT = Path(__file__).resolve().parents[1]
CODEX = Path(os.environ.get("TRIOPROXY_CODEX_BIN", ROOT / ".tools/codex/node_modules/.bin/codex"))
LOOP = 'Walk the steps, please.\nfake: steps 4 exec_command {"cmd": "echo step-#n-done"}'

DOCS = ROOT / "docs" / "codex.md"


def documented(name: str) -> str:
    """A config block exactly as docs/codex.md shows it, marked `<!-- tested: NAME -->`."""
    text = DOCS.read_text()
    marker = f"<!-- tested: {name} -->\n```toml\n"
    start = text.index(marker) + len(marker)
    return text[start : text.index("```", start)]


def config(server: ProxyServer, name: str, *extra: str, model: str | None = None) -> str:
    """The documented block pointed at this test's proxy, plus provider keys in `extra`
    (and a `model` line; without one Codex picks its default model)."""
    block = documented(name).replace("http://127.0.0.1:8787", root_of(server))
    top = f'model = "{model}"\n' if model else ""
    return top + block + "".join(f"{line}\n" for line in extra)


@dataclass
class Codex:
    """One `codex exec` run's home, environment and, afterwards, its result."""

    home: Path
    env: dict[str, str]
    workdir: Path
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    posts: list[int] = field(default_factory=list)

    def argv(self, prompt: str) -> list[str]:
        return [
            str(CODEX),
            "exec",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
            "-C",
            str(self.workdir),
            prompt,
        ]

    async def run(self, prompt: str, seconds: float = 90) -> Codex:
        with trio.fail_after(seconds):
            result = await trio.run_process(
                self.argv(prompt),
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        self.stdout, self.stderr = result.stdout.decode(), result.stderr.decode()
        self.returncode = result.returncode
        return self

    def succeeded(self) -> str:
        assert self.returncode == 0, self.stderr[-3000:]
        return self.stdout


def make_codex(base: Path, config: str, *, auth: dict[str, Any] | None = None, **env: str) -> Codex:
    """A CODEX_HOME with this config.toml (and auth.json), and a work directory."""
    assert CODEX.exists(), f"Codex CLI missing at {CODEX}: run `make codex` (make test does)"
    home, workdir = base / "codex-home", base / "work"
    home.mkdir(parents=True)
    workdir.mkdir()
    (home / "config.toml").write_text(config)
    if auth is not None:
        (home / "auth.json").write_text(json.dumps(auth))
        (home / "auth.json").chmod(0o600)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    return Codex(home, {**clean, "CODEX_HOME": str(home), "NO_COLOR": "1", **env}, workdir)


def root_of(server: ProxyServer) -> str:
    return server.base_url.removesuffix("/v1")


def record_posts(server: ProxyServer) -> list[int]:
    """Sizes of the request bodies clients POST: what the upstream gets without the proxy."""
    sizes: list[int] = []

    @server.app.before_request
    async def _record() -> None:
        if request.method == "POST":
            sizes.append(request.content_length or 0)

    return sizes


def assert_suffix_loop(creates: list[Received], steps: int) -> None:
    """One socket; turn 1 in full; every later turn only the new tool output plus the id."""
    assert len(creates) == steps + 1, [c.message.get("input") for c in creates]
    assert {c.socket for c in creates} == {creates[0].socket}
    first, later = creates[0], creates[1:]
    assert "previous_response_id" not in first.message and "stream" not in first.message
    assert first.message["store"] is False
    for n, turn in enumerate(later, start=1):
        assert turn.message["previous_response_id"], n
        new = turn.message["input"]
        assert [item["type"] for item in new] == ["function_call_output"], new
        assert f"step-{n}-done" in str(new[0]["output"])
        assert turn.size < first.size


def rate_limits(codex: Codex) -> list[dict[str, Any]]:
    """The rate-limit snapshots Codex wrote to its session rollout (`token_count` events)."""
    found = []
    for rollout in sorted((codex.home / "sessions").rglob("rollout-*.jsonl")):
        for line in rollout.read_text().splitlines():
            record = json.loads(line)
            payload = record.get("payload") or {}
            if record.get("type") == "event_msg" and payload.get("type") == "token_count":
                found.extend([payload["rate_limits"]] if payload.get("rate_limits") else [])
    return found


def assert_answered(stdout: str, steps: int) -> None:
    """Codex printed the model's final answer, which quotes the last tool output."""
    assert "The tool returned:" in stdout and f"step-{steps}-done" in stdout, stdout


def byte_table(label: str, posts: list[int], creates: list[Received]) -> str:
    rows = [f"{label}: turn, without proxy (HTTP body), with proxy (WebSocket frame)"]
    for n, (post, create) in enumerate(zip(posts, creates, strict=True), start=1):
        rows.append(f"  {n}: {post:>7,} B  {create.size:>7,} B")
    rows.append(f"  total: {sum(posts):,} B -> {sum(c.size for c in creates):,} B")
    return "\n".join(rows)


# -- (a) API key ---------------------------------------------------------------------------------
# Codex's default model takes its tools inside `input`; `gpt-5` takes them as the `tools` param,
# which every suffix turn must still carry. Both loops run.
@pytest.mark.parametrize("model", [None, "gpt-5"], ids=["default-model", "gpt-5"])
async def test_api_key_mode_runs_a_five_step_tool_loop_on_one_socket(
    server: ProxyServer, tmp_path: Path, model: str | None
) -> None:
    posts = record_posts(server)
    codex = make_codex(
        tmp_path,
        config(server, "api-key", model=model),
        OPENAI_API_KEY="sk-codex-test",
    )
    stdout = (await codex.run(LOOP)).succeeded()
    assert_answered(stdout, 4)

    fake = server.fake
    assert fake.sockets_opened == 1
    assert_suffix_loop(fake.creates(), steps=4)
    handshake = fake.handshakes[0]
    assert handshake["authorization"] == "Bearer sk-codex-test"
    assert handshake["session-id"] and handshake["originator"] == "codex_exec"
    assert handshake["openai-beta"].endswith("responses_websockets=2026-02-06")
    assert server.proxy.turns == {"full": 1, "suffix": 4}
    label = f"API-key mode, model {fake.creates()[0].message['model']}, 5-step tool loop"
    print("\n" + byte_table(label, posts, fake.creates()))


# -- (b) ChatGPT login, passed through ------------------------------------------------------------
@pytest.fixture
async def chatgpt_server(nursery: trio.Nursery, fake: FakeUpstream) -> ProxyServer:
    return await start_proxy(nursery, fake, chatgpt_upstream=fake.chatgpt_url)


async def test_chatgpt_login_pass_through_runs_the_loop_as_codex_would_upstream(
    chatgpt_server: ProxyServer, tmp_path: Path
) -> None:
    server, fake = chatgpt_server, chatgpt_server.fake
    posts = record_posts(server)
    auth = fake.logins.auth_json("acct-codex-1")
    codex = make_codex(
        tmp_path,
        config(server, "chatgpt"),
        auth=auth,
        CODEX_REFRESH_TOKEN_URL_OVERRIDE=fake.token_url,
    )
    stdout = (await codex.run(LOOP)).succeeded()
    assert_answered(stdout, 4)

    # Codex's model list went through the proxy, with its ChatGPT credentials.
    models = [r for r in fake.http_requests if r.target.startswith("/backend-api/codex/models")]
    assert models and "client_version=" in models[0].target
    assert models[0].headers["chatgpt-account-id"] == "acct-codex-1"
    # Turns reached the Codex backend path with what Codex itself sends there.
    assert fake.sockets_opened == 1
    handshake = fake.handshakes[0]
    assert handshake["authorization"] == f"Bearer {auth['tokens']['access_token']}"
    assert handshake["chatgpt-account-id"] == "acct-codex-1"
    assert handshake["originator"] == "codex_exec" and handshake["user-agent"]
    assert handshake["openai-beta"].endswith("responses_websockets=2026-02-06")
    assert handshake["session-id"]
    assert_suffix_loop(fake.creates(), steps=4)
    assert not fake.logins.token_requests  # a fresh login needs no refresh
    # The backend's rate-limit headers (the fake sends them on the upgrade) reached Codex
    # through the proxy: it recorded them with each turn's token count, as behind no proxy.
    limits = rate_limits(codex)
    assert limits and limits[-1]["primary"]["used_percent"] == 42.0
    assert limits[-1]["secondary"]["window_minutes"] == 10080
    label = f"ChatGPT pass-through, model {fake.creates()[0].message['model']}, 5-step tool loop"
    print("\n" + byte_table(label, posts, fake.creates()))


# -- (c) a login held by the proxy ----------------------------------------------------------------
async def test_held_login_with_an_expired_token_refreshes_once_and_the_turn_succeeds(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    auth_file = tmp_path / "proxy-codex" / "auth.json"
    auth_file.parent.mkdir()
    expired = {**fake.logins.auth_json("acct-held", lifetime=-60), "kept_by_codex": 1}
    server = await held_proxy(
        nursery, fake, write_auth(auth_file, expired), api_key="local-proxy-key"
    )
    # Codex in API-key mode, its key being the proxy's local key: the proxy holds the login.
    codex = make_codex(
        tmp_path / "client",
        config(server, "api-key"),
        OPENAI_API_KEY="local-proxy-key",
    )
    stdout = (await codex.run(LOOP)).succeeded()
    assert_answered(stdout, 4)

    assert len(fake.logins.token_requests) == 1
    rewritten = json.loads(auth_file.read_text())
    assert auth_file.stat().st_mode & 0o777 == 0o600
    assert rewritten["kept_by_codex"] == 1 and rewritten["last_refresh"] != expired["last_refresh"]
    new_token = rewritten["tokens"]["access_token"]
    assert new_token != expired["tokens"]["access_token"]
    assert rewritten["tokens"]["refresh_token"] != expired["tokens"]["refresh_token"]
    handshake = fake.handshakes[0]
    assert handshake["authorization"] == f"Bearer {new_token}"
    assert handshake["chatgpt-account-id"] == "acct-held"
    assert "local-proxy-key" not in json.dumps(fake.handshakes)
    assert fake.sockets_opened == 1
    assert_suffix_loop(fake.creates(), steps=4)


# -- (d) interrupted ------------------------------------------------------------------------------
async def test_codex_interrupted_mid_turn_leaves_no_socket_behind(
    server: ProxyServer, tmp_path: Path
) -> None:
    codex = make_codex(
        tmp_path,
        config(server, "api-key"),
        OPENAI_API_KEY="sk-codex-test",
    )
    fake = server.fake
    process = await trio.lowlevel.open_process(
        codex.argv("Take your time.\nfake: slow 0.5"),
        env=codex.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_until(lambda: fake.events_sent >= 2 and server.registry.live == 1, 60)
        assert server.registry.idle == 0  # mid-turn: the socket is busy
        process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    with trio.fail_after(5):
        await fake.wait_open_sockets(0)
    await wait_until(lambda: server.registry.live == 0 and server.registry.tasks == 0)
    assert server.registry.evictions["abandoned"] == 1
    assert fake.events_sent < 14  # the reply was cut short, not run to its end


# -- (e) two sessions -----------------------------------------------------------------------------
async def test_two_codex_sessions_side_by_side_get_a_socket_each(
    server: ProxyServer, tmp_path: Path
) -> None:
    settings = config(server, "api-key")
    runs = [
        make_codex(tmp_path / name, settings, OPENAI_API_KEY="sk-codex-test")
        for name in ("one", "two")
    ]
    prompt = 'Two steps.\nfake: steps 2 exec_command {"cmd": "echo step-#n-done"}\nfake: slow 0.05'
    async with trio.open_nursery() as nursery:
        for codex in runs:
            nursery.start_soon(codex.run, prompt)
    for codex in runs:
        assert_answered(codex.succeeded(), 2)

    fake = server.fake
    assert fake.sockets_opened == 2
    sessions = {h["session-id"] for h in fake.handshakes}
    assert len(sessions) == 2
    for socket in (1, 2):
        assert_suffix_loop([c for c in fake.creates() if c.socket == socket], steps=2)
    # Both ran at once: each socket's first turn came before the other's last.
    order = [c.socket for c in fake.creates()]
    assert order.index(2) < len(order) - 1 - order[::-1].index(1)


async def test_two_codex_sessions_with_lanes_share_one_socket_each_on_its_lane(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    server = await start_proxy(nursery, fake, lanes=True)
    settings = config(server, "api-key")
    runs = [
        make_codex(tmp_path / name, settings, OPENAI_API_KEY="sk-codex-test")
        for name in ("one", "two")
    ]
    prompt = 'Two steps.\nfake: steps 2 exec_command {"cmd": "echo step-#n-done"}\nfake: slow 0.05'
    async with trio.open_nursery() as group:
        for codex in runs:
            group.start_soon(codex.run, prompt)
    for codex in runs:
        assert_answered(codex.succeeded(), 2)  # Codex parsed every event: no lane leaked
    assert fake.sockets_opened == 1
    # The shared socket is no one session's: neither of Codex's per-conversation headers.
    assert not {"session-id", "thread-id"} & set(fake.handshakes[0])
    lanes = {c.message["stream_id"] for c in fake.creates()}
    assert len(lanes) == 2
    for lane in lanes:
        assert_suffix_loop([c for c in fake.creates() if c.message["stream_id"] == lane], 2)


# -- (f) Codex speaks WebSocket itself ------------------------------------------------------------
async def test_codex_with_websockets_runs_the_loop_over_a_websocket_to_the_proxy(
    server: ProxyServer, tmp_path: Path
) -> None:
    """`supports_websockets = true`: Codex opens ws://.../responses on the proxy, prewarms with
    `generate: false` and chains every later turn with `previous_response_id` + its new items;
    the proxy runs them all on one upstream socket and answers no 426."""
    codex = make_codex(
        tmp_path, config(server, "api-key-websocket"), OPENAI_API_KEY="sk-codex-test"
    )
    stdout = (await codex.run(LOOP)).succeeded()
    assert_answered(stdout, 4)
    fake, proxy = server.fake, server.proxy
    assert proxy.telemetry.refused_upgrades == 0
    assert fake.sockets_opened == 1
    creates = fake.creates()
    assert creates[0].message.get("generate") is False
    for turn in creates[2:]:
        assert turn.message["previous_response_id"]
        assert [item["type"] for item in turn.message["input"]] == ["function_call_output"]
    assert proxy.telemetry.clients["websocket-in"] == len(creates)
    # Codex's own rule: its first turn differs from the warm-up's parameters, so it goes in
    # full; each later turn chains with only its new item (measured: 1,969 B vs 55,578 B).
    assert proxy.turns == {"full": 2, "passthrough": 4}


async def test_two_codex_websocket_sessions_with_lanes_share_one_socket_each_on_its_lane(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    """Lanes on: Codex speaking WebSocket to the proxy takes its session's seat like an HTTP
    client, warm-up and chained turns alike, and parses every event (no lane of ours leaks)."""
    server = await start_proxy(nursery, fake, lanes=True)
    settings = config(server, "api-key-websocket")
    runs = [
        make_codex(tmp_path / name, settings, OPENAI_API_KEY="sk-codex-test")
        for name in ("one", "two")
    ]
    async with trio.open_nursery() as group:
        for codex in runs:
            group.start_soon(codex.run, LOOP)
    for codex in runs:
        assert_answered(codex.succeeded(), 4)
    assert server.proxy.telemetry.clients["websocket-in"] == len(fake.creates())
    assert fake.sockets_opened == 1
    by_lane: dict[str, list[Any]] = {}
    for create in fake.creates():
        by_lane.setdefault(create.message["stream_id"], []).append(create.message)
    assert len(by_lane) == 2
    for creates in by_lane.values():
        assert creates[0].get("generate") is False
        for turn in creates[2:]:  # each chain on its own lane, only its new item a turn
            assert turn["previous_response_id"]
            assert [item["type"] for item in turn["input"]] == ["function_call_output"]


async def test_codex_over_websocket_with_a_chatgpt_login_passed_through_and_held(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    """The same loop over WebSocket with Codex's ChatGPT login passed through, then with a
    login the proxy holds: one upstream socket each, the backend's credentials on it."""
    passthrough = await start_proxy(nursery, fake, chatgpt_upstream=fake.chatgpt_url)
    auth = fake.logins.auth_json("acct-ws")
    codex = make_codex(
        tmp_path / "pass",
        config(passthrough, "chatgpt", "supports_websockets = true"),
        auth=auth,
        CODEX_REFRESH_TOKEN_URL_OVERRIDE=fake.token_url,
    )
    assert_answered((await codex.run(LOOP)).succeeded(), 4)
    assert passthrough.proxy.telemetry.clients["websocket-in"] >= 5
    assert fake.sockets_opened == 1
    assert fake.handshakes[0]["chatgpt-account-id"] == "acct-ws"

    auth_file = tmp_path / "held" / "auth.json"
    auth_file.parent.mkdir()
    held = await held_proxy(
        nursery,
        fake,
        write_auth(auth_file, fake.logins.auth_json("acct-held-ws")),
        api_key="local-key",
    )
    codex = make_codex(
        tmp_path / "client",
        config(held, "api-key", "supports_websockets = true"),
        OPENAI_API_KEY="local-key",
    )
    assert_answered((await codex.run(LOOP)).succeeded(), 4)
    assert held.proxy.telemetry.clients["websocket-in"] >= 5
    assert fake.sockets_opened == 2
    assert fake.handshakes[1]["chatgpt-account-id"] == "acct-held-ws"
    assert "local-key" not in json.dumps(fake.handshakes)


async def test_codex_falls_back_to_http_when_the_proxy_takes_no_websocket_clients(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    server = await start_proxy(nursery, fake, websocket_clients=False)
    codex = make_codex(
        tmp_path,
        config(server, "api-key", "supports_websockets = true"),
        OPENAI_API_KEY="sk-codex-test",
    )
    stdout = (await codex.run(LOOP)).succeeded()
    assert_answered(stdout, 4)
    assert server.proxy.telemetry.refused_upgrades >= 1
    assert server.fake.sockets_opened == 1
    assert_suffix_loop(server.fake.creates(), steps=4)


# -- Codex-exact failures -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("script", "codex_says"),
    [
        # upstream `response.failed`, relayed as is
        ("fake: fail context_length_exceeded", "ran out of room in the model's context window"),
        # upstream `error` before any event: an HTTP error with an OpenAI error body
        ("fake: error insufficient_quota 429", "Quota exceeded"),
        # upstream `error` after the response began: `error` + `response.failed` on the stream
        ("fake: error insufficient_quota 429 2", "Quota exceeded"),
        ("fake: error context_length_exceeded 400 1", "context window"),
        # the socket dies mid-stream: Codex shows the proxy's reason, not a bare disconnect
        ("fake: drop 4", "the upstream WebSocket closed before the response finished"),
    ],
)
async def test_failures_reach_codex_in_the_shapes_it_parses(
    server: ProxyServer, tmp_path: Path, script: str, codex_says: str
) -> None:
    codex = make_codex(
        tmp_path,
        config(server, "api-key", "request_max_retries = 0", "stream_max_retries = 0"),
        OPENAI_API_KEY="sk-codex-test",
    )
    await codex.run(f"Please fail.\n{script}")
    assert codex.returncode != 0
    errors = [line for line in codex.stderr.splitlines() if line.startswith("ERROR:")]
    assert any(codex_says in line for line in errors), codex.stderr[-2000:]
    assert server.registry.pooled == 0  # a failed turn never leaves its socket in the pool
