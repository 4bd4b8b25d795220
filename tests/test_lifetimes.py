"""Idle TTL, max lifetime and the turn timeout, on a virtual clock.

The proxy core talks real WebSocket protocol to the fake upstream over in-memory streams, so
`MockClock(autojump_threshold=0)` jumps straight to each deadline: minutes pass in microseconds
and nothing depends on real timing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import Message

from tests.conftest import AUTH, memory_connector, user
from tests.test_wsclient import Peer, client
from trioproxy.config import Settings
from trioproxy.connector import Connector
from trioproxy.fake import FakeUpstream
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry
from trioproxy.targets import api_target
from trioproxy.turn import TurnEnd
from trioproxy.wsclient import ClientSocket

HEADERS = [(k, v) for k, v in AUTH.items()] + [("session-id", "s1")]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def make_proxy(nursery: trio.Nursery, fake: FakeUpstream, **settings: Any) -> Proxy:
    config = Settings(upstream="ws://fake/v1/responses", **settings)
    registry = Registry(config, memory_connector(fake))
    await nursery.start(registry.run)
    return Proxy(config, registry)


async def turn(proxy: Proxy, items: list[Any]) -> tuple[TurnEnd, list[Any]]:
    stream = await proxy.open_turn(
        {"model": "m", "input": items}, HEADERS, api_target(proxy.settings)
    )
    async for _ in stream:
        pass
    end = stream.end
    output = end.event.data["response"]["output"] if end.event is not None else []
    return end, output


async def test_idle_ttl_closes_the_socket(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await make_proxy(nursery, fake, idle_ttl=60, max_lifetime=3600, turn_timeout=10)
    end, _ = await turn(proxy, [user("a")])
    assert end.kind == "completed" and proxy.registry.pooled == 1
    await trio.sleep(59)
    assert proxy.registry.pooled == 1 and fake.open_sockets == 1
    await trio.sleep(2)
    assert proxy.registry.pooled == 0
    assert proxy.registry.evictions["idle_ttl"] == 1
    await fake.wait_open_sockets(0)
    await proxy.registry.aclose()


async def test_use_renews_the_idle_ttl(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await make_proxy(nursery, fake, idle_ttl=60, max_lifetime=3600, turn_timeout=10)
    history = [user("a")]
    _, out = await turn(proxy, history)
    await trio.sleep(50)
    history += [*out, user("b")]
    await turn(proxy, history)
    await trio.sleep(50)  # 100 s after the first turn, 50 after the last
    assert proxy.registry.pooled == 1
    assert [c.socket for c in fake.creates()] == [1, 1]
    await trio.sleep(11)
    assert proxy.registry.pooled == 0
    await proxy.registry.aclose()


async def test_max_lifetime_never_starts_a_turn_it_cannot_finish(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    # Turns may take 60 s, sockets live 300 s: no turn may start on a socket older than 240 s.
    proxy = await make_proxy(nursery, fake, idle_ttl=100, max_lifetime=300, turn_timeout=60)
    start = trio.current_time()
    history = [user("t0")]
    _, out = await turn(proxy, history)
    for i in range(1, 5):  # turns at 50, 100, 150, 200 s: all on socket 1, as suffixes
        await trio.sleep_until(start + 50 * i)
        history += [*out, user(f"t{i}")]
        _, out = await turn(proxy, history)
    await trio.sleep_until(start + 239)
    assert proxy.registry.pooled == 1
    await trio.sleep_until(start + 241)
    assert proxy.registry.pooled == 0 and proxy.registry.evictions["max_lifetime"] == 1
    history += [*out, user("t5")]
    await turn(proxy, history)
    creates = fake.creates()
    assert [c.socket for c in creates] == [1, 1, 1, 1, 1, 2]
    assert "previous_response_id" not in creates[-1].message  # a fresh socket: full input
    assert len(creates[-1].message["input"]) == len(history)
    await proxy.registry.aclose()


async def test_a_socket_reaching_its_lifetime_during_a_turn_is_retired_after_it(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream(event_delay=2.0)  # each turn takes ~20 s of virtual time
    proxy = await make_proxy(nursery, fake, idle_ttl=1000, max_lifetime=100, turn_timeout=50)
    start = trio.current_time()
    await turn(proxy, [user("a b c")])
    # The socket was born at `start` (in-memory handshakes take no virtual time).
    await trio.sleep_until(start + 45)
    end, _ = await turn(proxy, [user("a b c")])  # starts at 45 s, ends past the 50 s mark
    assert end.kind == "completed" and trio.current_time() > start + 50
    assert proxy.registry.pooled == 0 and proxy.registry.evictions["max_lifetime"] == 1
    await proxy.registry.aclose()


async def test_turn_timeout_is_a_clear_error_and_evicts(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream(event_delay=30.0)
    proxy = await make_proxy(nursery, fake, idle_ttl=600, max_lifetime=1200, turn_timeout=100)
    end, _ = await turn(proxy, [user("one two three four five six seven eight nine ten")])
    assert end.kind == "timeout"
    assert end.error is not None and end.error.status == 504
    assert end.error.code == "upstream_timeout"
    assert proxy.registry.pooled == 0
    await fake.wait_open_sockets(0)
    await proxy.registry.aclose()


async def test_shutdown_closes_every_socket(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await make_proxy(nursery, fake)
    for session in ("a", "b", "c"):
        headers = [*HEADERS[:-1], ("session-id", session)]
        stream = await proxy.open_turn(
            {"model": "m", "input": "x"}, headers, api_target(proxy.settings)
        )
        async for _ in stream:
            pass
    assert fake.open_sockets == 3
    await proxy.registry.aclose()
    assert proxy.registry.live == 0
    await fake.wait_open_sockets(0)


async def test_an_idle_socket_keeps_nothing_of_its_last_turn(nursery: trio.Nursery) -> None:
    """The request, its payload and its parsed events go with the turn: an idle pooled socket
    holds digests and an id, not the hundreds of KB a Codex turn parses."""
    fake = FakeUpstream()
    proxy = await make_proxy(nursery, fake)
    stream = await proxy.open_turn(
        {"model": "m", "input": [user("a")]}, HEADERS, api_target(proxy.settings)
    )
    async for _ in stream:
        pass
    assert stream.end.kind == "completed"
    last = weakref.ref(stream.turn)
    del stream
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    assert proxy.registry.idle == 1
    assert last() is None, gc.get_referrers(last())
    await proxy.registry.aclose()


def describe(n: int) -> str:
    """Text that does not compress much on its own (hex digests), about 500 bytes."""
    return " ".join(hashlib.sha256(f"{n}-{k}".encode()).hexdigest() for k in range(8))


async def test_an_idle_socket_frees_its_compressor_and_still_talks(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Within `deflate_hold` a continuation compresses against the last turn; after it the
    compressor is gone and the next message is a fresh deflate stream the upstream still reads."""
    fake = FakeUpstream()
    proxy = await make_proxy(nursery, fake, deflate_hold=60)
    tools = [{"type": "function", "name": f"t{n}", "description": describe(n)} for n in range(20)]
    history: list[Any] = [user("a")]
    wire = []
    for wait in (0, 10, 61):
        await trio.sleep(wait)
        stream = await proxy.open_turn(
            {"model": "m", "input": history, "tools": tools}, HEADERS, api_target(proxy.settings)
        )
        async for _ in stream:
            pass
        assert stream.end.kind == "completed" and stream.end.event is not None
        wire.append((stream.turn.sent_bytes, stream.turn.wire_bytes))
        history += [*stream.end.event.data["response"]["output"], user(f"after {wait}")]
    assert [c.socket for c in fake.creates()] == [1, 1, 1]
    _, (size, kept), (_, fresh) = wire
    assert kept < size * 0.05, wire  # tools are back-references into the last turn
    assert kept * 5 < fresh < size, wire  # compressed on its own, and the upstream read it
    await proxy.registry.aclose()


async def test_an_idle_socket_does_not_keep_its_last_read(nursery: trio.Nursery) -> None:
    """Reads are up to `RECEIVE_BYTES`, and a turn's last one carries the end of its
    `response.completed`, which echoes the instructions. An idle socket's task waits in its
    next read (wsclient.py: no reader task of trio-websocket's, which kept its last read in a
    local while it waited); no frame on its way there may hold an earlier read or message
    alive, or a pool of idle sockets keeps them all (P4)."""
    fake = FakeUpstream()
    fake.deflate = False
    proxy = await make_proxy(nursery, fake, permessage_deflate=False)
    stream = await proxy.open_turn(
        {"model": "m", "input": [user("a")], "instructions": "Be brief. " * 4_000},
        HEADERS,
        api_target(proxy.settings),
    )
    async for _ in stream:
        pass
    assert stream.end.kind == "completed"
    del stream
    await trio.testing.wait_all_tasks_blocked()
    assert proxy.registry.idle == 1
    tasks = _all_tasks(trio.lowlevel.current_root_task())
    readers = [task.coro.cr_frame.f_locals["self"] for task in tasks if "_reader" in task.name]
    assert not [reader for reader in readers if reader.is_client]  # the fake's serve only
    ours = [
        (frame.f_code.co_name, name, len(value))
        for task in tasks
        for frame in _awaiting(task.coro)
        if "/trioproxy/" in frame.f_code.co_filename and "/fake/" not in frame.f_code.co_filename
        for name, value in frame.f_locals.items()
        if isinstance(value, (bytes, bytearray, str)) and len(value) > 1024
    ]
    waiting = [frame.f_code.co_name for task in tasks for frame in _awaiting(task.coro)]
    assert "read_some" in waiting  # the idle socket reads (pings, a close)
    assert ours == [], ours  # it held its last read of the 40 KB response.completed
    await proxy.registry.aclose()


def _awaiting(coro: Any) -> list[Any]:
    """The frames of a coroutine and of what it awaits, down the chain."""
    frames = []
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frames.append(coro.cr_frame)
        coro = coro.cr_await
    return frames


def _all_tasks(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = [task]
    for child in task.child_nurseries:
        for sub in child.child_tasks:
            found += _all_tasks(sub)
    return found


class _Holder:
    """A WebSocket client of the proxy, reduced to what the socket sees: a sink."""

    def __init__(self) -> None:
        self.heard: list[Any] = []

    @property
    def sink(self) -> Any:
        holder = self

        class _Sink:
            def offer(self, event: Any) -> None:
                holder.heard.append(event)

        return _Sink()


async def test_a_client_holding_an_idle_socket_hears_its_frames(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A WebSocket client that holds its session's idle socket (to relay an event) attaches
    before it submits anything: frames arriving meanwhile are that client's (an `error` about
    the connection), not strays that would close the socket."""
    fake = FakeUpstream()
    proxy = await make_proxy(nursery, fake)
    end, _ = await turn(proxy, [user("a")])
    assert end.kind == "completed"
    await trio.testing.wait_all_tasks_blocked()  # the socket's task reads, idle
    holder = _Holder()
    conn = await proxy.hold_socket(HEADERS, api_target(proxy.settings), None, holder)
    await trio.testing.wait_all_tasks_blocked()
    error = {"type": "error", "error": {"code": "notice", "message": "about the connection"}}
    await fake.send_stray(json.dumps(error))
    await trio.testing.wait_all_tasks_blocked()
    assert [event.type for event in holder.heard] == ["error"]
    assert conn.accepting and fake.open_sockets == 1
    await proxy.registry.aclose()


async def test_a_frame_right_behind_a_turns_end_closes_the_idle_socket_at_once(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """An `error` that comes in the same read as a turn's last event is queued when the
    socket goes idle: it is judged before the socket waits, so the socket closes then rather
    than at the session's next turn (which would pay a failed try first)."""

    async def answer(peer: Peer) -> None:
        await peer.accept()
        create = json.loads(await peer.message())
        assert create["type"] == "response.create"
        response = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
        burst = [
            {"type": "response.created", "sequence_number": 0, "response": response},
            {
                "type": "response.completed",
                "sequence_number": 1,
                "response": {**response, "status": "completed"},
            },
            {"type": "error", "error": {"code": "late", "message": "behind the end"}},
        ]
        await peer.stream.send_all(
            b"".join(peer.ws.send(Message(data=json.dumps(event))) for event in burst)
        )
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await peer.stream.receive_some(65536):
                pass

    config = Settings(upstream="ws://peer/v1/responses")
    registry = Registry(config, peer_connector(answer))
    await nursery.start(registry.run)
    proxy = Proxy(config, registry)
    end, _ = await turn(proxy, [user("a")])
    assert end.kind == "completed"
    await trio.testing.wait_all_tasks_blocked()
    assert registry.pooled == 0
    await registry.aclose()


def peer_connector(serve: Callable[[Peer], Awaitable[None]]) -> Connector:
    """The production client (`open_websocket`) against a wsproto peer in this test."""

    @asynccontextmanager
    async def connect(url: str, headers: list[tuple[bytes, bytes]]) -> AsyncIterator[ClientSocket]:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, Peer(server_stream))
            async with client(client_stream) as sock:
                yield sock
            nursery.cancel_scope.cancel()

    return connect
