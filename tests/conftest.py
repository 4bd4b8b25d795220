"""Shared fixtures: a real fake upstream on 127.0.0.1, the proxy under a real hypercorn server."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio
from trio_websocket import wrap_server_stream

from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import Settings
from trioproxy.connector import Connector
from trioproxy.fake import FakeUpstream
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry
from trioproxy.wsclient import ClientSocket, WsUrl, open_websocket

AUTH = {"authorization": "Bearer sk-test-key"}


@dataclass
class ProxyServer:
    base_url: str  # ends in /v1, as clients are configured
    app: QuartTrio
    fake: FakeUpstream

    @property
    def proxy(self) -> Proxy:
        proxy: Proxy = self.app.extensions["trioproxy"]
        return proxy

    @property
    def registry(self) -> Registry:
        return self.proxy.registry

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=30, **kwargs)


@pytest.fixture(autouse=True)
def no_egress_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine's own HTTP(S)_PROXY must not divert the tests' loopback traffic (the tests
    that exercise a proxy set their own)."""
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeUpstream:
    upstream = FakeUpstream()
    await nursery.start(upstream.serve)
    return upstream


# `make test` runs the cancellation, fault and isolation suites a second time with lanes on
# (TRIOPROXY_TEST_LANES=1): every proxy they start then seats sessions on shared sockets.
LANES = os.environ.get("TRIOPROXY_TEST_LANES") == "1"


async def start_proxy(
    nursery: trio.Nursery, fake: FakeUpstream, connector: Connector | None = None, **overrides: Any
) -> ProxyServer:
    settings = Settings(**{"upstream": fake.url, "lanes": LANES, **overrides})
    app = create_app(settings, connector=connector)
    config = hypercorn_config("127.0.0.1", 0, settings.write_timeout, settings.max_body_bytes)
    binds = await nursery.start(partial(hypercorn_serve, app, config))
    return ProxyServer(binds[0].rstrip("/") + "/v1", app, fake)


def write_auth(path: Path, doc: dict[str, Any]) -> Path:
    """A Codex `auth.json`, private as `codex login` leaves it."""
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


async def held_proxy(
    nursery: trio.Nursery, fake: FakeUpstream, auth: Path, **overrides: Any
) -> ProxyServer:
    """A proxy holding the ChatGPT login in `auth`, against the fake's Codex backend."""
    return await start_proxy(
        nursery,
        fake,
        chatgpt_upstream=fake.chatgpt_url,
        codex_auth=str(auth),
        codex_token_url=fake.token_url,
        **overrides,
    )


@pytest.fixture
async def server(nursery: trio.Nursery, fake: FakeUpstream) -> ProxyServer:
    return await start_proxy(nursery, fake)


def memory_connector(
    fake: FakeUpstream,
    *,
    deflate: bool = True,
    wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
) -> Connector:
    """Real WebSocket protocol to the fake upstream over in-memory streams: no real I/O, so
    tests under an autojumping MockClock stay deterministic. The client side is the
    production one (`wsclient.open_websocket`), deflate offer included; `wrap` stands between
    the client and its stream (a slow uplink, say)."""

    @asynccontextmanager
    async def connect(url: str, headers: list[tuple[bytes, bytes]]) -> AsyncIterator[ClientSocket]:
        async with trio.open_nursery() as nursery:

            async def opener(target: WsUrl) -> trio.abc.Stream:
                client_stream, server_stream = trio.testing.memory_stream_pair()

                async def serve_one() -> None:
                    request = await wrap_server_stream(nursery, server_stream)
                    await fake.handle(request)

                nursery.start_soon(serve_one)
                return client_stream if wrap is None else wrap(client_stream)

            async with open_websocket(
                url,
                headers,
                deflate=deflate,
                connect_timeout=10,
                close_timeout=1,
                max_message_size=64 * 2**20,
                opener=opener,
            ) as sock:
                yield sock
            nursery.cancel_scope.cancel()

    return connect


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def request_body(input_items: list[Any] | str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "input": input_items, **extra}


async def post(
    client: httpx.AsyncClient, body: Any, session: str | None = "s1", **headers: str
) -> httpx.Response:
    all_headers = {**AUTH, **headers}
    if session is not None:
        all_headers["session-id"] = session
    return await client.post("/responses", json=body, headers=all_headers)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse an SSE body into (event, data) pairs, checking the framing as clients do."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: "), block
        assert lines[1].startswith("data: "), block
        assert len(lines) == 2, block
        out.append((lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])))
    return out


async def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll a condition that the code under test reaches in a task of its own; bounded."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110 (the state belongs to the code under test)
            await trio.sleep(0.01)


async def nothing_left(server: ProxyServer) -> None:
    """Only idle pooled sockets remain: no busy one, no stray task, no unowned upstream socket
    (the fault suite's leak check, run after every hostile case too)."""
    registry, fake = server.registry, server.fake
    await wait_until(lambda: registry.tasks == registry.live == registry.idle)
    with trio.fail_after(5):
        await fake.wait_open_sockets(registry.live)
