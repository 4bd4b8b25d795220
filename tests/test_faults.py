"""The fault suite: every way the upstream can fail, over real sockets, and what the client sees.

Each case ends in a complete stream, a transparent retry or a clear OpenAI-style error, never a
hang (pytest-timeout and the `fail_after` in `nothing_left` bound every wait), and each checks
afterwards that no socket task and no upstream socket is left but the idle pooled ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import wrap_server_stream

from tests.conftest import (
    AUTH,
    LANES,
    ProxyServer,
    nothing_left,
    post,
    request_body,
    sse_events,
    start_proxy,
    user,
    wait_until,
)
from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import Settings
from trioproxy.connector import Connector
from trioproxy.fake import FakeUpstream, Reply
from trioproxy.proxy import SHARED_EVENT_BUFFER
from trioproxy.wsclient import ClientSocket, open_websocket


# -- handshake -----------------------------------------------------------------------------------
async def test_handshake_refused_at_tcp_is_a_502(nursery: trio.Nursery, fake: FakeUpstream) -> None:
    # A port bound and kept, with nobody listening: connections are refused. (A port closed
    # again could be the next server's: once it was the proxy's own, which then served its
    # own upgrade, hop after hop.)
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = await start_proxy(nursery, fake, upstream=f"ws://127.0.0.1:{port}/v1/responses")
        async with server.client() as client:
            reply = await post(client, request_body("x", stream=True))
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "upstream_unreachable"
    await nothing_left(server)
    assert server.registry.live == 0


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "invalid_api_key"),
        (403, "unsupported_country_region_territory"),
        (429, "rate_limit_exceeded"),
        (500, "server_error"),
        (503, "service_unavailable"),
    ],
)
async def test_handshake_rejection_keeps_its_status_and_body(
    server: ProxyServer, status: int, code: str
) -> None:
    server.fake.refuse_handshakes(status, code)
    async with server.client() as client:
        reply = await post(client, request_body("x", stream=True))
    # The upstream's 503 becomes 502: a balancer reads a 503 as "this instance is draining".
    assert reply.status_code == (502 if status == 503 else status)
    error = reply.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    await nothing_left(server)
    assert server.registry.live == 0 and server.fake.creates() == []


async def test_handshake_that_never_completes_times_out(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    fake.stall_handshakes = True
    server = await start_proxy(nursery, fake, connect_timeout=0.3)
    async with server.client() as client:
        reply = await post(client, request_body("x"))
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert error["code"] == "upstream_unreachable" and "timed out" in error["message"]
    fake.stall_handshakes = False
    await nothing_left(server)
    assert server.registry.live == 0


@pytest.mark.parametrize("status", [400, 404, 426])
async def test_handshake_refused_as_no_websocket_falls_back_to_http(
    server: ProxyServer, status: int
) -> None:
    server.fake.refuse_handshakes(status, "no_websocket")
    async with server.client() as client:
        reply = await post(client, request_body([user("a")], stream=True))
    assert reply.status_code == 200
    assert sse_events(reply.text)[-1][0] == "response.completed"
    assert len(server.fake.http_posts) == 1 and server.fake.creates() == []
    await nothing_left(server)
    assert server.registry.live == 0


# -- a message larger than the upstream takes ----------------------------------------------------
async def test_a_message_too_large_for_a_socket_goes_over_http_once(server: ProxyServer) -> None:
    """The upstream closes with 1009 on a message larger than it takes. No socket would take
    it (and a retry on a shared socket would end its other lanes too); an HTTP POST has no
    message limit: the turn goes that way, once, and completes."""
    fake = server.fake
    fake.max_message_bytes = 100_000
    async with server.client() as client:
        reply = await post(client, request_body([user("x" * 200_000)], stream=True))
    assert reply.status_code == 200, reply.text
    assert sse_events(reply.text)[-1][0] == "response.completed"
    assert fake.sockets_opened == 1 and len(fake.http_posts) == 1
    assert server.proxy.retries["too_large"] == 1 and server.proxy.retries["socket"] == 0
    await nothing_left(server)


async def test_a_message_too_large_without_the_http_fallback_is_413(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, http_fallback=False)
    fake.max_message_bytes = 100_000
    async with server.client() as client:
        reply = await post(client, request_body([user("x" * 200_000)]))
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == "upstream_message_too_large"
    assert fake.sockets_opened == 1 and not fake.http_posts  # not sent again: it cannot pass
    await nothing_left(server)


# -- before the first event: a transparent retry ---------------------------------------------------
async def test_socket_dropped_before_the_first_event_is_retried_on_a_fresh_socket(
    server: ProxyServer,
) -> None:
    server.fake.queue(Reply.drop(after_events=0))
    async with server.client() as client:
        reply = await post(client, request_body([user("a")], stream=True))
    assert reply.status_code == 200
    assert sse_events(reply.text)[-1][0] == "response.completed"
    assert server.fake.sockets_opened == 2 and server.proxy.retries["socket"] == 1
    await nothing_left(server)
    assert server.registry.idle == 1  # the retry's socket is the session's now


async def test_socket_closed_by_upstream_while_idle_is_replaced_transparently(
    server: ProxyServer,
) -> None:
    """An idle socket reads (wsclient.py): it answers the close and leaves the pool when the
    close comes, so the next turn opens a fresh socket at once, with no failed try first."""
    fake = server.fake
    async with server.client() as client:
        first = await post(client, request_body([user("a")]))
        assert server.registry.idle == 1
        await fake.close_sockets()
        await fake.wait_open_sockets(0)
        await wait_until(lambda: server.registry.idle == 0)
        history = [user("a"), *first.json()["output"], user("b")]
        second = await post(client, request_body(history))
    assert second.status_code == 200, second.text
    creates = fake.creates()
    assert fake.sockets_opened == 2
    assert creates[-1].socket == 2
    assert "previous_response_id" not in creates[-1].message
    assert len(creates[-1].message["input"]) == 3  # the full input on the fresh socket
    assert server.proxy.retries["socket"] == 0
    await nothing_left(server)


async def test_an_idle_socket_answers_pings_and_stays_the_sessions(server: ProxyServer) -> None:
    """No reader task (wsclient.py): the idle socket's own task reads while it waits for a
    job, so a keep-alive ping is answered, and the next turn still continues on it."""
    fake = server.fake
    async with server.client() as client:
        first = await post(client, request_body([user("a")]))
        with trio.fail_after(5):
            await fake.ping_sockets()
            await fake.ping_sockets()
        history = [user("a"), *first.json()["output"], user("b")]
        second = await post(client, request_body(history))
    assert second.status_code == 200, second.text
    assert fake.sockets_opened == 1
    assert fake.creates()[-1].message["previous_response_id"] == first.json()["id"]
    await nothing_left(server)


async def test_previous_response_not_found_is_resent_in_full(server: ProxyServer) -> None:
    fake = server.fake
    async with server.client() as client:
        first = await post(client, request_body([user("a")]))
        # The upstream loses the chain (as it does for any failed continuation).
        fake.queue(Reply.error("previous_response_not_found"))
        history = [user("a"), *first.json()["output"], user("b")]
        second = await post(client, request_body(history, stream=True))
        assert second.status_code == 200
        events = sse_events(second.text)
        assert events[-1][0] == "response.completed"
        assert all(t != "error" for t, _ in events)
        # The new socket is the session's now, and chains from the resent turn.
        third = await post(
            client, request_body([*history, *events[-1][1]["response"]["output"], user("c")])
        )
        assert third.status_code == 200
    creates = fake.creates()
    # With lanes the shared socket is sound, only the chain is gone: the resend stays on it.
    assert [c.socket for c in creates] == ([1, 1, 1, 1] if LANES else [1, 1, 2, 2])
    assert creates[1].message["previous_response_id"] == first.json()["id"]
    assert "previous_response_id" not in creates[2].message
    assert len(creates[2].message["input"]) == 3
    assert creates[3].message["input"] == [user("c")]
    assert server.proxy.retries["previous_response_not_found"] == 1
    await nothing_left(server)


async def test_a_second_failure_reaches_the_client(server: ProxyServer) -> None:
    fake = server.fake
    fake.queue(
        Reply.error("websocket_connection_limit_reached", 429),
        Reply.error("websocket_connection_limit_reached", 429),
    )
    async with server.client() as client:
        reply = await post(client, request_body([user("a")], stream=True))
    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "websocket_connection_limit_reached"
    assert fake.sockets_opened == 2
    await nothing_left(server)


async def test_upstream_error_before_streaming_is_an_http_error(server: ProxyServer) -> None:
    server.fake.queue(Reply.error("context_length_exceeded", 400, "Your input is too long."))
    async with server.client() as client:
        reply = await post(client, request_body([user("a")], stream=True))
    assert reply.status_code == 400
    assert reply.json() == {
        "error": {
            "message": "Your input is too long.",
            "type": "invalid_request_error",
            "param": None,
            "code": "context_length_exceeded",
        }
    }
    if LANES:  # a named lane's refusal evicts the session's lane; the shared socket stays
        assert server.registry.lanes.moved["turn_error"] == 1
        assert server.registry.stats()["seats"] == 0 and server.fake.open_sockets == 1
    else:
        await server.fake.wait_open_sockets(0)
        assert server.registry.pooled == 0 and server.registry.evictions["error"] == 1
    await nothing_left(server)


async def test_upstream_drop_mid_stream_ends_in_an_error_event(server: ProxyServer) -> None:
    server.fake.queue(Reply.drop(after_events=4))
    async with server.client() as client:
        reply = await post(client, request_body([user("a")], stream=True))
    assert reply.status_code == 200
    events = sse_events(reply.text)
    assert len(events) == 6
    kind, error = events[-2]
    assert kind == "error"
    assert error["code"] == "upstream_connection_closed"
    assert error["sequence_number"] == 4
    assert set(error) == {"type", "code", "message", "param", "sequence_number"}
    # Then `response.failed` for the response the client saw created: Codex reads only that.
    kind, failed = events[-1]
    assert kind == "response.failed" and failed["sequence_number"] == 5
    assert failed["response"]["id"] == events[0][1]["response"]["id"]
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": error["code"], "message": error["message"]}
    assert server.registry.pooled == 0
    await nothing_left(server)


async def test_upstream_drop_without_stream_is_a_502(server: ProxyServer) -> None:
    server.fake.queue(Reply.drop(after_events=3))
    async with server.client() as client:
        reply = await post(client, request_body([user("a")]))
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "upstream_connection_closed"
    await nothing_left(server)


async def test_upstream_handshake_refusal_maps_to_the_same_status(server: ProxyServer) -> None:
    server.fake.require_auth = True
    async with server.client() as client:
        reply = await client.post(
            "/responses",
            json=request_body("x"),
            headers={"authorization": "Basic nope", "session-id": "s"},
        )
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"
    assert server.registry.pooled == 0 and server.registry.live == 0
    await nothing_left(server)


# -- silence and garbage ---------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_silent_past_the_read_timeout(
    nursery: trio.Nursery, fake: FakeUpstream, stream: bool
) -> None:
    server = await start_proxy(nursery, fake, read_timeout=0.3)
    fake.queue(Reply("stall", after_events=2))
    async with server.client() as client:
        with trio.fail_after(10):
            reply = await post(client, request_body([user("a")], stream=stream))
    if stream:
        events = sse_events(reply.text)
        assert [t for t, _ in events] == [
            "response.created",
            "response.in_progress",
            "error",
            "response.failed",
        ]
        assert events[2][1]["code"] == "upstream_timeout"
        assert "sent nothing for 0.3 s" in events[2][1]["message"]
    else:
        assert reply.status_code == 504
        assert reply.json()["error"]["code"] == "upstream_timeout"
    await nothing_left(server)
    assert server.registry.live == 0 and server.registry.evictions["timeout"] == 1


async def test_unreadable_upstream_frames_are_retried_once_then_a_clear_error(
    server: ProxyServer,
) -> None:
    server.fake.queue(Reply("garbage"), Reply("garbage"))
    async with server.client() as client:
        reply = await post(client, request_body([user("a")]))
    assert reply.status_code == 502
    assert reply.json()["error"]["code"] == "bad_event"
    assert server.fake.sockets_opened == 2
    await nothing_left(server)
    assert server.registry.live == 0


# -- a client that does not read ---------------------------------------------------------------
async def test_a_slow_client_slows_its_socket_instead_of_growing_memory(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, event_buffer=8)
    words = 60_000  # 20,000 delta events, ~2 MB of frames
    async with (
        server.client() as client,
        client.stream(
            "POST",
            "/responses",
            json=request_body(f"fake: long {words}", stream=True),
            headers={"authorization": "Bearer sk", "session-id": "slow"},
        ) as reply,
    ):
        chunks = reply.aiter_raw()
        first = await chunks.__anext__()
        assert first.startswith(b"event: response.created")
        # The client stops reading. The upstream keeps sending only until the buffers fill:
        # the turn's channel (8 events), the socket's, the kernel's. Then it waits.
        await wait_until(lambda: fake.events_sent > 100)
        sent = -1
        while sent != fake.events_sent:
            sent = fake.events_sent
            await trio.sleep(0.2)
        total = words // 3 + 8
        if LANES:
            # A shared socket never waits for one client (it would stall every lane): the
            # turn holds a bounded backlog, then ends with `client_too_slow`.
            assert server.registry.buffered_events <= SHARED_EVENT_BUFFER
            assert server.registry.buffered_bytes <= server.proxy.settings.event_buffer_bytes
        else:
            assert sent < total // 2, (sent, total)
            assert server.registry.buffered_events == 8  # a full, bounded backlog
        body = first + b"".join([chunk async for chunk in chunks])
    events = sse_events(body.decode())
    if LANES:
        assert events[-1][0] == "response.failed" and events[-2][1]["code"] == "client_too_slow"
        assert len(events) < fake.events_sent // 2  # what was buffered, not the rest
    else:
        assert events[-1][0] == "response.completed" and len(events) == fake.events_sent
    await nothing_left(server)


class _StopsReading(trio.abc.Stream):
    """An upstream's side of the connection that reads `after` bytes, then nothing more."""

    def __init__(self, inner: trio.abc.Stream, after: int) -> None:
        self.inner, self.after, self.got = inner, after, 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.got >= self.after:
            await trio.sleep_forever()
        data = await self.inner.receive_some(min(max_bytes or 65536, 4096))
        self.got += len(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


def _upstream_that_stops_reading() -> Connector:
    @asynccontextmanager
    async def connect(url: str, headers: list[tuple[bytes, bytes]]) -> AsyncIterator[ClientSocket]:
        async with trio.open_nursery() as nursery:

            async def opener(target: object) -> trio.abc.Stream:
                client, server = trio.testing.lockstep_stream_pair()

                async def serve_one() -> None:
                    request = await wrap_server_stream(nursery, _StopsReading(server, 8192))
                    await request.accept()
                    await trio.sleep_forever()

                nursery.start_soon(serve_one)
                return client

            async with open_websocket(
                url,
                headers,
                deflate=False,
                connect_timeout=5,
                close_timeout=0.1,
                max_message_size=1 << 26,
                opener=opener,
            ) as sock:
                yield sock
            nursery.cancel_scope.cancel()

    return connect


async def test_an_upstream_that_stops_reading_cannot_hold_a_turn_past_its_timeout(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """Sending the request is part of the turn: bounded by `turn_timeout` like its events."""
    server = await start_proxy(
        nursery,
        fake,
        connector=_upstream_that_stops_reading(),
        turn_timeout=0.5,
        read_timeout=0.3,
        http_fallback=False,
    )
    async with server.client() as client:
        with trio.fail_after(5):
            reply = await post(client, request_body([user("x" * 200_000)]), session="stall")
    assert reply.status_code == 504
    await wait_until(lambda: server.registry.live == 0)


async def test_a_client_that_stops_reading_cannot_hold_a_turn_past_its_timeout(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """Back-pressure stops the upstream read, and the turn's own deadline still runs."""
    server = await start_proxy(nursery, fake, turn_timeout=0.5, event_buffer_bytes=64 * 1024)
    fake.queue(Reply.message(" ".join(["w" * 4096] * 3000)))  # ~12 MB of deltas
    async with server.client() as client:
        headers = {**AUTH, "session-id": "unread"}
        body = request_body("go", stream=True)
        async with client.stream("POST", "/responses", json=body, headers=headers) as reply:
            chunks = reply.aiter_raw()  # kept: a dropped iterator would close the response
            await chunks.__anext__()  # the turn runs; then nothing is read
            if LANES:  # only its lane is cut: the shared socket serves the others
                await wait_until(lambda: server.registry.lanes.moved["turn_timeout"] == 1)
            else:
                await wait_until(lambda: server.registry.evictions["timeout"] == 1)
            assert server.fake.events_sent < 3000


async def test_an_upstream_that_leads_back_to_the_proxy_is_refused_not_looped(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """Misconfigured: the proxy's upstream is the proxy itself. Every request it sends upstream
    carries its loop mark, and a request that comes back with it gets 508 at once, over HTTP
    and WebSocket alike: one clear error instead of one more socket per hop."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    settings = Settings(upstream=f"ws://127.0.0.1:{port}/v1/responses", http_fallback=False)
    app = create_app(settings)
    await nursery.start(partial(hypercorn_serve, app, hypercorn_config("127.0.0.1", port)))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=10) as client:
        with trio.fail_after(5):
            reply = await post(client, request_body("x"))
    assert reply.status_code == 508
    assert reply.json()["error"]["code"] == "proxy_loop"
