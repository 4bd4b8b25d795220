"""An upstream WebSocket driven by the task that owns it: wsproto on a trio stream, no reader.

trio-websocket runs a reader task per connection that parses frames and hands each message to
its caller over a channel: two task switches per upstream event, and the reader was 16-22 % of
the proxy's CPU (issue "Capacity", py-spy). Here the socket's own task reads, feeds wsproto and
takes the messages a read completed from a queue; since no one else reads, it also answers
pings and the close handshake, idle or not (upstream.py reads while it waits for a job).
Nearly every event is one whole, unfragmented text frame: while wsproto holds no part of a frame
those are taken straight from the read (`_split`, inflated with the same decompressor when
compressed) and everything else goes to wsproto whole and in order; wsproto's per-frame Python
was about a tenth of the proxy's CPU.

Codex offers permessage-deflate, and for this proxy it pays twice: every continuation turn
repeats `tools` and `instructions` (tens of KB the previous message already carried), which
deflate with context takeover sends as a few back-references. So the upgrade offers it; an
upstream that declines gets plain frames.

Errors keep trio-websocket's types (`ConnectionClosed` with a `CloseReason`,
`ConnectionRejected`, `ConnectionTimeout`, `HandshakeError`): one vocabulary for the proxy,
its tests and the fake upstream, which serves with trio-websocket.

Cancelling a read loses nothing (trio's socket and TLS streams keep unread bytes in the kernel
or the TLS buffer when a receive is cancelled outside the TLS handshake), so the owner waits
for a frame in a cancel scope a new job or a deadline cancels. Cancelling a send can cut a
frame, so a control frame's answer (pong, close) is shielded and bounded.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from typing import ClassVar, cast

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
)
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import ProtocolError

from trioproxy.endpoint import Endpoint, open_stream

Headers = list[tuple[bytes, bytes]]


class CountingStream(trio.abc.Stream):
    """A transport stream that counts the bytes it moves (the wire cost after compression) and
    its reads."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.sent = 0
        self.received = 0
        self.reads = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        self.received += len(data)
        self.reads += 1
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclasses.dataclass(frozen=True, slots=True)
class WsUrl(Endpoint):
    """Where a `ws://` or `wss://` URL points."""

    SCHEMES: ClassVar[tuple[str, ...]] = ("ws", "wss")


class Deflate(PerMessageDeflate):
    """wsproto's permessage-deflate, plus a way to give back the compressor's memory.

    Offered with full 32 KiB windows and context takeover: the window still holds the previous
    turn, which turns the repeated `tools` into back-references. The price is the compressor's
    state, about 200 KiB per socket. A sender may always start a fresh raw-deflate stream (its
    output stays a valid continuation for the receiver, it just refers to nothing older), so a
    socket that stays idle can drop its compressor; its next message compresses on its own.
    """

    @property
    def compressing(self) -> bool:
        """Whether compression state is held (created by the first message sent)."""
        return self._compressor is not None

    def inflate(self, payload: bytes | bytearray, limit: int) -> bytes:
        """A whole compressed message's bytes, as wsproto's frame decoder would inflate it
        (with the same decompressor, so the window carries on when the upstream keeps its
        context); more than `limit` bytes means too large. Raises zlib.error."""
        if self._decompressor is None:
            self._decompressor = zlib.decompressobj(-int(self.server_max_window_bits))
        data = self._decompressor.decompress(bytes(payload) + b"\x00\x00\xff\xff", limit + 1)
        if len(data) > limit:
            return data  # the caller refuses it; the socket closes
        data += self._decompressor.flush()
        if self.server_no_context_takeover:
            self._decompressor = None
        return data

    def release(self) -> None:
        """Drop the compressor; only between messages (its owner is not sending)."""
        self._compressor = None


Opener = Callable[[Endpoint], Awaitable[trio.abc.Stream]]

# Bytes per read from the upstream's TCP stream (trio-websocket reads 4 KiB at a time): a
# turn's three ~20 KB response objects take two reads each instead of five, each read a
# syscall and a pass of wsproto's parser (-8 % CPU per event). 64 KiB saved no more CPU and
# cost an idle pool 14 KB a socket of heap left fragmented by the larger transient reads.
RECEIVE_BYTES = 16 * 1024
# Characters per frame of a message too large to send in one (see `ClientSocket.send_text`).
FRAGMENT = 256 * 1024
# The most of a refused upgrade's body kept (what the error says); the rest is not read.
REJECTION_BYTES = 64 * 1024
# How long answering a control frame (a pong, the close handshake's reply) may take: shielded
# from the owner's cancel scopes, so it must end on its own.
REPLY_TIMEOUT = 5.0
# "The connection ended without a close frame" (RFC 6455 7.1.5), as trio-websocket says it.
_ABNORMAL = 1006


# First bytes of a frame `_split` may take: a final text frame, plain or compressed.
_SIMPLE = frozenset({0x81, 0xC1})


class _Refused(Exception):
    """A message read past wsproto that fails the connection: (close code, reason)."""


def _whole_head(buf: bytearray, pos: int, size: int) -> bool:
    """Whether `buf[pos:size]` holds a frame's whole head (its length fields)."""
    if size - pos < 2:
        return False
    length = buf[pos + 1] & 0x7F
    return size - pos >= (4 if length == 126 else 10 if length == 127 else 2)


class ClientSocket:
    """An open upstream WebSocket and the counter of what crossed the wire under it.

    Only its owner calls it, one call at a time: `message_nowait` for a message a read already
    completed, `receive` (or `read_some` when idle) to read, `send_text` to send.
    """

    def __init__(self, wire: CountingStream, offer: Deflate | None, max_message_size: int) -> None:
        self.wire = wire
        self.offer = offer  # wsproto finalizes it if the upstream accepts
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._conn: Connection | None = None  # once the upgrade is accepted
        self._max = max_message_size
        self._messages: deque[str | bytes] = deque()
        self._raw = bytearray()  # the start of a frame read past wsproto (`_split`)
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0
        # Why it closed (the peer's close frame, or 1006 for a stream that ended without one).
        self.closed: CloseReason | None = None
        # The upgrade answer's headers (rate limits, the model): read by upstream.py.
        self.handshake_headers: tuple[tuple[bytes, bytes], ...] = ()
        self._answering: trio.CancelScope | None = None  # a control frame's shielded send
        # An answer owed from the handshake's read (a ping right behind the 101): sent at the
        # first read, when the owner holds the socket and `abort` can reach it.
        self._owed: Event | None = None
        self.closed_by_peer = False  # its close frame came from the upstream (not wsproto's)
        self._opening = True
        self._broken = False  # a send may have stopped halfway: close without a handshake

    @property
    def deflate(self) -> bool:
        """Whether the upstream accepted permessage-deflate."""
        return self.offer is not None and self.offer.enabled()

    @property
    def compressing(self) -> bool:
        return self.offer is not None and self.offer.compressing

    def release_compression(self) -> None:
        """Free the compressor's memory between messages (see `Deflate`)."""
        if self.offer is not None:
            self.offer.release()

    async def handshake(self, target: Endpoint, headers: Headers) -> None:
        """Send the upgrade and read its answer. Raises `ConnectionRejected` for an answer
        with a status, `HandshakeError` for a stream that ends or speaks no HTTP."""
        offer = [self.offer] if self.offer is not None else []
        request = Request(
            host=target.host_header,
            target=target.resource,
            extra_headers=headers,
            extensions=offer,
        )
        await self.wire.send_all(self._ws.send(request))
        status: int | None = None
        rejected: tuple[tuple[bytes, bytes], ...] = ()
        body = bytearray()
        while True:
            data = await self.wire.receive_some(RECEIVE_BYTES)
            if not data:
                if status is not None:  # a refusal whose body the stream's end delimits
                    raise ConnectionRejected(status, rejected, bytes(body))
                raise HandshakeError from ConnectionError("closed before answering the upgrade")
            self._ws.receive_data(cast(bytes, data))
            events = self._ws.events()
            for event in events:
                if isinstance(event, AcceptConnection):
                    self.handshake_headers = tuple(event.extra_headers)
                    self._conn = self._ws.connection
                    await self._take(events)  # frames that came in the same read
                    self._opening = False
                    return
                if isinstance(event, RejectConnection):
                    status, rejected = event.status_code, tuple(event.headers)
                    if not event.has_body:
                        raise ConnectionRejected(status, rejected, None)
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished or len(body) >= REJECTION_BYTES:
                        # Enough to say why: a refusal's body is not read without end.
                        raise ConnectionRejected(
                            status or 0, rejected, bytes(body[:REJECTION_BYTES])
                        )

    def message_nowait(self) -> str | bytes:
        """The next message a read already completed, else `trio.WouldBlock`; raises
        `ConnectionClosed` once none is left on a closed socket.

        A turn's events arrive in bursts: taking the rest of a burst without a round through
        the scheduler per message lets them reach the client as one write.
        """
        if self._messages:
            return self._messages.popleft()
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        raise trio.WouldBlock

    async def receive(self) -> str | bytes:
        """The next message, reading as long as it takes. Safe to cancel. A read is a
        checkpoint already (trio's receive always yields), so only a message taken without
        one yields here: one scheduler round per read, not two."""
        if self._messages:
            await trio.lowlevel.checkpoint()
        while not self._messages:
            await self.read_some()
        return self._messages.popleft()

    async def read_some(self) -> None:
        """One read: the messages it completes are queued for `message_nowait`, pings and a
        close frame answered. Raises `ConnectionClosed` on a closed socket. Safe to cancel:
        the only checkpoints are the read and the shielded answers."""
        if self._owed is not None:
            owed, self._owed = self._owed, None
            await self._answer(owed)
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        try:
            data = await self.wire.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = CloseReason(_ABNORMAL, None)
            return
        assert self._conn is not None
        if self._raw or (data[0] in _SIMPLE and self._at_boundary()):
            try:
                rest = self._split(data)
            except _Refused as exc:
                await self._fail(*exc.args)
                return
            if not rest:
                return
            data = rest
        self._conn.receive_data(cast(bytes, data))
        await self._take(self._conn.events())

    def _at_boundary(self) -> bool:
        """Whether wsproto holds no part of a frame or a message (the next byte starts a frame
        that may be read without it)."""
        proto = getattr(self._conn, "_proto", None)
        decoder = getattr(proto, "_frame_decoder", None)
        messages = getattr(proto, "_message_decoder", None)
        return (
            decoder is not None
            and messages is not None
            and decoder.header is None
            and not decoder.buffer.buffer
            and messages.opcode is None
        )

    def _split(self, data: bytes | bytearray) -> bytes:
        """Take the whole unfragmented text frames at the start of what was read (nearly
        every event; compressed ones inflated as wsproto would) as messages, without
        wsproto's per-frame Python; return the bytes from the first other frame on (control
        frames, fragments, anything odd) for wsproto. A frame not yet whole waits here for
        the next read. Only called while wsproto holds no part of a frame (`_at_boundary`)."""
        buf = self._raw
        buf += data
        pos, size = 0, len(buf)
        inflate = self.offer if self.offer is not None and self.offer.enabled() else None
        while True:
            if size - pos < 10 and not _whole_head(buf, pos, size):
                del buf[:pos]  # the rest of the head comes with the next read
                return b""
            first, length = buf[pos], buf[pos + 1]
            if length & 0x80 or (first != 0x81 and (first != 0xC1 or inflate is None)):
                break  # not a final text frame (compressed only if negotiated), or masked
            head = 2
            if length == 126:
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
                if length < 126:
                    break  # not the shortest encoding: wsproto refuses it
            elif length == 127:
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
                if length < 65536:
                    break
            if length > self._max:
                break  # wsproto and `_take` refuse it (1009)
            end = pos + head + length
            if end > size:
                del buf[:pos]  # the rest of the frame comes with the next read
                return b""
            payload: bytes | bytearray = buf[pos + head : end]
            if first == 0xC1:
                assert inflate is not None
                try:
                    payload = inflate.inflate(payload, self._max)
                except zlib.error:
                    raise _Refused(1007, "error in extension") from None
                if len(payload) > self._max:
                    raise _Refused(1009, f"Exceeded maximum message size: {self._max} bytes")
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                if first == 0xC1:
                    raise _Refused(1007, "invalid UTF-8 in a text message") from None
                break  # wsproto fails the connection (1007)
            self._messages.append(text)
            pos = end
        rest = bytes(buf[pos:])
        buf.clear()
        return rest

    async def _take(self, events: Iterator[Event]) -> None:
        """Queue complete messages (joined from their frames); answer control frames. Of the
        pings one read brings only the last is answered (RFC 6455 5.5.3 allows it): a peer
        flooding pings gets one pong per read, not one shielded send each."""
        ping: Ping | None = None
        for event in events:
            if self.closed is not None:
                return  # closed (a close frame, a message past the limit): nothing more
            if isinstance(event, (TextMessage, BytesMessage)):
                if event.message_finished and not self._parts:
                    if len(event.data) > self._max:
                        await self._fail(1009, f"Exceeded maximum message size: {self._max} bytes")
                    else:
                        data = event.data
                        self._messages.append(data if isinstance(data, str) else bytes(data))
                    continue
                self._parts.append(event.data)
                self._size += len(event.data)
                if self._size > self._max:
                    await self._fail(1009, f"Exceeded maximum message size: {self._max} bytes")
                elif event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    if isinstance(event, TextMessage):
                        self._messages.append("".join(cast(list[str], parts)))
                    else:
                        self._messages.append(b"".join(cast(list[bytes], parts)))
            elif isinstance(event, Ping):
                ping = event
            elif isinstance(event, CloseConnection):
                self.closed = CloseReason(event.code, event.reason or None)
                self.closed_by_peer = self._ws.state is ConnectionState.REMOTE_CLOSING
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._answer(event.response())
                elif self._ws.state is ConnectionState.OPEN:
                    # wsproto could not parse a frame: fail the connection, saying why.
                    await self._answer(CloseConnection(code=event.code, reason=event.reason))
        if ping is not None and self.closed is None:
            await self._answer(ping.response())

    async def _fail(self, code: int, reason: str) -> None:
        self._parts, self._size = [], 0
        self.closed = CloseReason(code, reason)
        await self._answer(CloseConnection(code=code, reason=reason))

    async def _answer(self, event: Event) -> None:
        """Send a control frame, shielded from the owner's waits (a new job cancels a read,
        and a send cut halfway leaves the stream broken) and bounded by `REPLY_TIMEOUT`; only
        `abort` (the owner dropping the socket) cuts it short. A peer that does not take it
        gets the socket marked closed."""
        if self._opening:
            self._owed = event  # nothing is sent shielded inside the handshake's time limit
            return
        try:
            data = self._ws.send(event)
        except ProtocolError:
            return  # no longer sendable in this state (closing): nothing to answer
        with trio.CancelScope(shield=True) as answering, trio.move_on_after(REPLY_TIMEOUT):
            self._answering = answering
            try:
                await self.wire.send_all(data)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._answering = None
        self._broken = True  # possibly cut halfway: no close handshake on this stream
        if self.closed is None:
            self.closed = CloseReason(_ABNORMAL, None)

    def abort(self) -> None:
        """The owner drops the socket (killed, shutting down): an answer being sent stops
        waiting for the peer at once, and nothing more is read."""
        self._broken = True
        if self.closed is None:
            self.closed = CloseReason(_ABNORMAL, None)
        if self._answering is not None:
            self._answering.cancel()

    async def send_text(
        self, payload: bytes, between: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """Send `payload` (UTF-8 JSON) as one text message. A large one goes as fragments of
        `FRAGMENT` characters: encoding, masking and compressing ten megabytes at once holds
        the event loop for tens of milliseconds, and every other client with it. `between`
        runs after each fragment but the last (a shared socket's owner reads the other lanes'
        events there); False from it stops the send (`trio.ClosedResourceError`)."""
        if self.closed is not None or self._conn is None:
            raise ConnectionClosed(self.closed)
        if len(payload) <= FRAGMENT:
            await self.wire.send_all(self._conn.send(TextMessage(data=payload.decode())))
            return
        text = payload.decode()
        for start in range(0, len(text), FRAGMENT):
            last = start + FRAGMENT >= len(text)
            chunk = TextMessage(data=text[start : start + FRAGMENT], message_finished=last)
            await self.wire.send_all(self._conn.send(chunk))
            if last:
                return
            if between is None:
                # A send the kernel takes at once need not yield: let the others run.
                await trio.lowlevel.checkpoint()
            elif not await between():
                raise trio.ClosedResourceError("the socket closed while a message was sent")

    async def read_ready(self, wait: float) -> None:
        """`read_some` if bytes come within `wait` seconds; otherwise nothing (the read is
        cancelled, which loses nothing)."""
        with trio.move_on_after(wait):
            await self.read_some()

    async def aclose(self, grace: float) -> None:
        """The close handshake, bounded by `grace` seconds, then the stream closes. Not shielded: a
        cancelled owner (a killed socket) closes the stream at once."""
        try:
            if self._ws.state is ConnectionState.OPEN and not self._broken:
                self.closed = self.closed or CloseReason(1000, None)
                if self._raw:  # a frame begun past wsproto (`_split`) is its again
                    self._ws.receive_data(bytes(self._raw))
                    self._raw.clear()
                with trio.move_on_after(grace):
                    await self.wire.send_all(self._ws.send(CloseConnection(code=1000)))
                    while not self._closed_both_ways():
                        data = await self.wire.receive_some(RECEIVE_BYTES)
                        if not data:
                            break
                        self._ws.receive_data(cast(bytes, data))
                        for _ in self._ws.events():  # late frames: nobody's any more
                            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with suppress(trio.BrokenResourceError):
                await self.wire.aclose()

    def _closed_both_ways(self) -> bool:
        return self._ws.state is ConnectionState.CLOSED


@asynccontextmanager
async def open_websocket(
    url: str,
    headers: Headers,
    *,
    deflate: bool,
    events_context: bool = False,
    connect_timeout: float,
    close_timeout: float,
    max_message_size: int,
    opener: Opener | None = None,
) -> AsyncIterator[ClientSocket]:
    """An open client WebSocket and its byte counter, closed (close handshake bounded by
    `close_timeout`) on exit. `opener` makes the transport stream (tests pass in-memory ones).
    With `events_context` off the offer asks the upstream not to compress a message against
    earlier ones (server_no_context_takeover), so no decompressor outlives a message.

    `connect_timeout` bounds the whole opening: the stream, TLS, and the upgrade's answer.
    Raises `ConnectionRejected` for an upgrade answered with a status, `ConnectionTimeout`,
    and `HandshakeError` for network errors (the cause attached).
    """
    target = WsUrl.parse(url)
    offer = Deflate(server_no_context_takeover=not events_context) if deflate else None
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await (opener or open_stream)(target)
            sock = ClientSocket(CountingStream(stream), offer, max_message_size)
            await sock.handshake(target, headers)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise ConnectionTimeout from None
        # ValueError: an acceptance wsproto cannot take (a malformed deflate parameter).
        if isinstance(exc, (OSError, trio.BrokenResourceError, ProtocolError, ValueError)):
            raise HandshakeError from exc
        raise
    try:
        yield sock
    finally:
        await sock.aclose(close_timeout)
