"""The upstream WebSocket client (wsclient.py) against a peer that does what servers may do.

The peer is wsproto on the other end of an in-memory stream, so it can send what a well-kept
library never would: garbage, a close mid-message, a message past the limit, a ping while
nobody waits for a frame. Every case ends in a message, or in a clear `ConnectionClosed`,
`ConnectionRejected`, `HandshakeError` or `ConnectionTimeout`: never a hang.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, ConnectionTimeout, HandshakeError
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from trioproxy.endpoint import Endpoint
from trioproxy.wsclient import FRAGMENT, REJECTION_BYTES, ClientSocket, open_websocket


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Every test takes it: waits (a close handshake nobody answers, a timeout) pass at once."""
    return trio.testing.MockClock(autojump_threshold=0)


class Peer:
    """The server's end: wsproto over the other half of the stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self._events: list[Event] = []
        self.closed_with: int | None = None

    async def next_event(self) -> Event:
        while not self._events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self._events += list(self.ws.events())
        return self._events.pop(0)

    async def accept(self, then: bytes = b"") -> None:
        assert isinstance(await self.next_event(), Request)
        await self.stream.send_all(self.ws.send(AcceptConnection()) + then)

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def answer_close(self) -> None:
        """Wait for the client's close frame and answer it (the close handshake)."""
        event = await self.next_event()
        assert isinstance(event, CloseConnection), event
        self.closed_with = event.code
        await self.send(event.response())

    async def message(self) -> str:
        parts = []
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts)


def client(
    stream: trio.abc.Stream, *, deflate: bool = False, max_message_size: int = 1 << 20
) -> AbstractAsyncContextManager[ClientSocket]:
    """The production client (`open_websocket`) over `stream`, to this module's peers."""

    async def opener(target: Endpoint) -> trio.abc.Stream:
        return stream

    return open_websocket(
        "ws://peer/v1/responses",
        [],
        deflate=deflate,
        connect_timeout=5,
        close_timeout=1,
        max_message_size=max_message_size,
        opener=opener,
    )


@asynccontextmanager
async def pair(*, max_message_size: int = 1 << 20) -> AsyncIterator[tuple[ClientSocket, Peer]]:
    """A client socket and its peer, the handshake done by `Peer.accept`."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = Peer(server_stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.accept)
        async with client(client_stream, max_message_size=max_message_size) as sock:
            yield sock, peer


async def test_messages_whole_and_fragmented_and_the_close_handshake(
    clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery, pair() as (sock, peer):
        await peer.send(Message(data='{"a": 1}'))
        await peer.send(TextMessage(data='{"b":', message_finished=False))
        await peer.send(TextMessage(data=" 2}", message_finished=True))
        assert await sock.receive() == '{"a": 1}'
        assert await sock.receive() == '{"b": 2}'
        with pytest.raises(trio.WouldBlock):
            sock.message_nowait()
        await sock.send_text(b'{"type": "response.create"}')
        assert json.loads(await peer.message()) == {"type": "response.create"}
        nursery.start_soon(peer.answer_close)  # leaving the block closes it with a handshake
        started = trio.current_time()
    assert peer.closed_with == 1000
    assert trio.current_time() - started < 0.5  # the answer ended it, not `close_timeout`


async def test_a_ping_is_answered_by_whoever_reads(clock: trio.testing.MockClock) -> None:
    """No reader task: the socket's owner answers pings as it reads, and an idle socket
    reads too (upstream.py), so a keep-alive ping is never left unanswered."""
    async with pair() as (sock, peer):
        await peer.send(Ping(payload=b"are you there"))
        await peer.send(Message(data="{}"))
        assert await sock.receive() == "{}"
        event = await peer.next_event()
        assert isinstance(event, Pong) and event.payload == b"are you there"


async def test_a_close_from_the_peer_is_answered_and_said(clock: trio.testing.MockClock) -> None:
    async with pair() as (sock, peer):
        await peer.send(Message(data="last"))
        await peer.send(CloseConnection(code=1001, reason="going away"))
        assert await sock.receive() == "last"  # what came before the close is still read
        with pytest.raises(ConnectionClosed) as closed:
            await sock.receive()
        assert (closed.value.reason.code, closed.value.reason.reason) == (1001, "going away")
        reply = await peer.next_event()
        assert isinstance(reply, CloseConnection) and reply.code == 1001
        with pytest.raises(ConnectionClosed):
            await sock.send_text(b"{}")


@pytest.mark.parametrize("fragmented", [False, True])
async def test_a_message_past_the_limit_closes_with_1009(
    fragmented: bool, clock: trio.testing.MockClock
) -> None:
    async with pair(max_message_size=1000) as (sock, peer):
        if fragmented:
            for _ in range(3):
                await peer.send(TextMessage(data="x" * 400, message_finished=False))
        else:
            await peer.send(Message(data="x" * 1001))
        with pytest.raises(ConnectionClosed) as closed:
            await sock.receive()
        assert closed.value.reason.code == 1009
        event = await peer.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1009


async def test_an_unparseable_frame_fails_the_connection(clock: trio.testing.MockClock) -> None:
    async with pair() as (sock, peer):
        await peer.stream.send_all(b"\x83\x00")  # opcode 3 is reserved
        with pytest.raises(ConnectionClosed) as closed:
            await sock.receive()
        assert closed.value.reason.code == 1002
        event = await peer.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1002


async def test_a_stream_that_ends_mid_message_is_an_abnormal_close(
    clock: trio.testing.MockClock,
) -> None:
    async with pair() as (sock, peer):
        await peer.send(TextMessage(data='{"half', message_finished=False))
        await peer.stream.aclose()
        with pytest.raises(ConnectionClosed) as closed:
            await sock.receive()
        assert closed.value.reason.code == 1006


async def test_a_cancelled_read_loses_nothing(clock: trio.testing.MockClock) -> None:
    """The socket's task waits for a frame in a cancel scope that a new job cancels: the
    bytes that arrive after it gave up are read by the next wait, none lost."""
    async with pair() as (sock, peer):
        with trio.move_on_after(0.01):
            await sock.receive()
        await peer.send(Message(data="after"))
        assert await sock.receive() == "after"


async def test_a_large_message_goes_in_fragments_and_arrives_whole(
    clock: trio.testing.MockClock,
) -> None:
    payload = json.dumps({"input": "é" * (FRAGMENT + 10)}).encode()
    async with pair() as (sock, peer), trio.open_nursery() as nursery:
        nursery.start_soon(sock.send_text, payload)
        assert (await peer.message()).encode() == payload


async def test_frames_in_the_same_read_as_the_upgrade_are_kept(
    clock: trio.testing.MockClock,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = Peer(server_stream)

    async with trio.open_nursery() as nursery:
        frame = WSConnection(ConnectionType.SERVER)  # a throwaway to frame one message
        frame.receive_data(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        list(frame.events())
        frame.send(AcceptConnection())
        nursery.start_soon(peer.accept, frame.send(Message(data="early")))
        async with client(client_stream) as sock:
            assert sock.message_nowait() == "early"


async def _handshake_with(answer: bytes, close: bool = True) -> BaseException:
    """What opening a socket raises when the peer answers the upgrade with `answer`."""
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def answering() -> None:
        await server_stream.receive_some(65536)
        await server_stream.send_all(answer)
        if close:
            await server_stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answering)
        with pytest.raises((HandshakeError, ConnectionTimeout)) as raised:
            async with client(client_stream, deflate=True):
                pass
        nursery.cancel_scope.cancel()
    return raised.value


async def test_a_refused_upgrade_says_its_status_and_body(clock: trio.testing.MockClock) -> None:
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    list(server.events())
    body = b'{"error": {"code": "rate_limit_exceeded"}}'
    headers = [(b"content-length", str(len(body)).encode())]
    answer = server.send(RejectConnection(status_code=429, headers=headers, has_body=True))
    answer += server.send(RejectData(data=body))
    refused = await _handshake_with(answer, close=False)
    assert isinstance(refused, ConnectionRejected)
    assert (refused.status_code, refused.body) == (429, body)
    # A body the stream's end delimits (no length) is read to that end.
    unsized = b"HTTP/1.1 503 Service Unavailable\r\n\r\ndown for maintenance"
    refused = await _handshake_with(unsized)
    assert isinstance(refused, ConnectionRejected)
    assert (refused.status_code, refused.body) == (503, b"down for maintenance")


async def test_a_refusal_is_not_read_without_end(clock: trio.testing.MockClock) -> None:
    """A hostile upstream's endless refusal body: the first `REJECTION_BYTES` say why."""
    endless = b"HTTP/1.1 403 Forbidden\r\n\r\n" + b"x" * (4 * REJECTION_BYTES)
    refused = await _handshake_with(endless, close=False)
    assert isinstance(refused, ConnectionRejected)
    assert refused.status_code == 403 and refused.body == b"x" * REJECTION_BYTES


@pytest.mark.parametrize("answer", [b"", b"SSH-2.0-OpenSSH_9.6\r\n"])
async def test_no_answer_or_not_http_is_a_handshake_error(
    answer: bytes, clock: trio.testing.MockClock
) -> None:
    failed = await _handshake_with(answer)
    assert type(failed) is HandshakeError and failed.__cause__ is not None


async def test_an_upgrade_never_answered_times_out(clock: trio.testing.MockClock) -> None:
    client_stream, _server_stream = trio.testing.memory_stream_pair()

    with pytest.raises(ConnectionTimeout):
        async with client(client_stream):
            pass


async def test_a_ping_flood_gets_one_pong_per_read(clock: trio.testing.MockClock) -> None:
    async with pair() as (sock, peer):
        flood = b"".join(peer.ws.send(Ping(payload=str(n).encode())) for n in range(50))
        await peer.stream.send_all(flood + peer.ws.send(Message(data="{}")))
        assert await sock.receive() == "{}"
        pong = await peer.next_event()
        assert isinstance(pong, Pong) and pong.payload == b"49"  # the latest only
        with trio.move_on_after(1):
            extra = await peer.next_event()
            raise AssertionError(f"a second pong: {extra}")


async def test_abort_cuts_a_pong_the_peer_does_not_take(clock: trio.testing.MockClock) -> None:
    """A pong is shielded from the owner's waits (a new job cancels a read), so a peer that
    stops reading could hold the owner for `REPLY_TIMEOUT`; dropping the socket (`kill`,
    shutdown) must not wait for it."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()  # no buffer at all
    peer = Peer(server_stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.accept)
        async with client(client_stream) as sock:
            await trio.testing.wait_all_tasks_blocked()  # the upgrade's answer is taken
            nursery.start_soon(peer.send, Ping(payload=b"then stop reading"))
            started = trio.current_time()
            with trio.CancelScope() as reading:
                nursery.start_soon(_abort_soon, sock, reading)
                with pytest.raises(ConnectionClosed):  # or the cancel, whichever comes first
                    await sock.receive()
            assert trio.current_time() - started < 0.5  # not REPLY_TIMEOUT
            assert sock.closed is not None and sock.closed.code == 1006


async def _abort_soon(sock: ClientSocket, reading: trio.CancelScope) -> None:
    await trio.sleep(0.1)
    reading.cancel()  # what a kill does to the owner's scope...
    sock.abort()  # ...and to the shielded send


async def test_an_acceptance_wsproto_cannot_take_is_a_handshake_error(
    clock: trio.testing.MockClock,
) -> None:
    """A 101 whose deflate parameters are out of range (window bits 99) is the upstream's
    fault, said as a `HandshakeError` like any other broken upgrade, not a stray ValueError."""
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def answer() -> None:
        request = await server_stream.receive_some(65536)
        key = re.search(rb"(?i)sec-websocket-key: *([^\r]+)", request)
        assert key is not None
        digest = hashlib.sha1(key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        await server_stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=99\r\n\r\n"
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        with pytest.raises(HandshakeError) as failed:
            async with client(client_stream, deflate=True):
                pass
    assert type(failed.value) is HandshakeError and failed.value.__cause__ is not None


async def test_a_ping_behind_the_upgrade_is_answered_at_the_first_read(
    clock: trio.testing.MockClock,
) -> None:
    """Nothing is sent shielded while the handshake's time limit runs (review 41: a peer that
    stops reading could hold the open past `connect_timeout`, out of a kill's reach): a ping
    in the 101's read is answered by the owner's first read."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    peer = Peer(server_stream)
    framer = WSConnection(ConnectionType.SERVER)  # frames a ping and a message for the 101
    framer.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    list(framer.events())
    framer.send(AcceptConnection())
    behind = framer.send(Ping(payload=b"early")) + framer.send(Message(data="first"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer.accept, behind)
        async with client(client_stream) as sock:
            assert sock.message_nowait() == "first"
            with trio.move_on_after(1):
                await peer.next_event()
                raise AssertionError("answered inside the handshake")
            await peer.send(Message(data="second"))
            assert await sock.receive() == "second"
            pong = await peer.next_event()
            assert isinstance(pong, Pong) and pong.payload == b"early"
