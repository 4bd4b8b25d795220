"""Open a client WebSocket that offers permessage-deflate, and count its bytes on the wire.

trio-websocket (0.12) builds the client's upgrade request itself and takes only subprotocols
and extra headers, so it never offers an extension. Codex offers permessage-deflate, and for
this proxy it pays twice: every continuation turn repeats `tools` and `instructions` (tens of
KB the previous message already carried), which deflate with context takeover sends as a few
back-references. So this module does what `trio_websocket.connect_websocket` does, with one
change: the initial `Request` carries a `PerMessageDeflate` offer. If the upstream does not
accept it, wsproto carries on uncompressed. Everything after the handshake is trio-websocket's.

It leans on private names of `WebSocketConnection` (`_initial_request`, `_reader_task`,
`_open_handshake`, and `_recv_channel` for a non-blocking receive); pyproject pins
trio-websocket below 0.13, and the tests cover both an upstream that accepts and one that
declines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import ClassVar

import trio
from trio_websocket import ConnectionClosed, ConnectionTimeout, HandshakeError, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import TextMessage
from wsproto.extensions import PerMessageDeflate

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
        self._last = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The next bytes, valid until the next call. trio-websocket's reader keeps its last
        read in a local while it waits for the next one, so an idle socket would keep up to
        `RECEIVE_BYTES` alive (a Codex turn's last read is part of its `response.completed`);
        wsproto copies what it is fed, so the read handed out last is emptied here instead."""
        self._last.clear()
        data = await self._stream.receive_some(max_bytes)
        self.received += len(data)
        self.reads += 1
        self._last = bytearray(data)
        return self._last

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

    def release(self) -> None:
        """Drop the compressor; only between messages (its owner is not sending)."""
        self._compressor = None


Opener = Callable[[Endpoint], Awaitable[trio.abc.Stream]]

# Messages the reader task may parse ahead of the socket's task (trio-websocket's default is 1,
# which makes the reader wait for every single event to be taken). A burst of a turn's events
# is then parsed in one go; the bound keeps back-pressure from a slow client reaching TCP.
MESSAGE_QUEUE = 32
# Bytes per read from the upstream's TCP stream (trio-websocket reads 4 KiB at a time): a
# turn's three ~20 KB response objects take two reads each instead of five, each read a
# syscall and a pass of wsproto's parser (-8 % CPU per event). 64 KiB saved no more CPU and
# cost an idle pool 14 KB a socket of heap left fragmented by the larger transient reads.
RECEIVE_BYTES = 16 * 1024
# Characters per frame of a message too large to send in one (see `ClientSocket.send_text`).
FRAGMENT = 256 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSocket:
    """An open upstream WebSocket and the counter of what crossed the wire under it."""

    ws: WebSocketConnection
    wire: CountingStream
    offer: Deflate | None = None  # wsproto finalizes it if the upstream accepts

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

    async def send_text(self, payload: bytes) -> None:
        """Send `payload` (UTF-8 JSON) as one text message. A large one goes as fragments of
        `FRAGMENT` characters: encoding, masking and compressing ten megabytes at once holds
        the event loop for tens of milliseconds, and every other client with it."""
        ws = self.ws
        if len(payload) <= FRAGMENT:
            await ws.send_message(payload.decode())
            return
        if ws._close_reason:
            raise ConnectionClosed(ws._close_reason)
        text = payload.decode()
        for start in range(0, len(text), FRAGMENT):
            last = start + FRAGMENT >= len(text)
            chunk = text[start : start + FRAGMENT]
            await ws._send(TextMessage(data=chunk, message_finished=last))
            # A send the kernel takes at once need not yield: let the others run.
            await trio.lowlevel.checkpoint()

    def message_nowait(self) -> str | bytes:
        """The next message if the reader task has queued it already, else `trio.WouldBlock`.

        `get_message` always yields to the scheduler, even with messages waiting; a turn's
        events arrive in bursts, and taking the rest of a burst without a round trip through
        the scheduler per message lets them reach the client as one write.
        """
        try:
            return self.ws._recv_channel.receive_nowait()
        except (trio.ClosedResourceError, trio.EndOfChannel):
            raise ConnectionClosed(self.ws._close_reason) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception that matters in a nursery's group (the reader's, not a Cancelled)."""
    real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    return real[0] if len(real) == 1 else group


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

    Raises what `trio_websocket.open_websocket_url` raises: `ConnectionRejected` for an
    upgrade answered with a status, `ConnectionTimeout`, `HandshakeError` for network errors.
    """
    target = WsUrl.parse(url)
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout):
                    stream = CountingStream(await (opener or open_stream)(target))
                    ws = WebSocketConnection(
                        stream,
                        WSConnection(ConnectionType.CLIENT),
                        host=target.host_header,
                        path=target.resource,
                        client_extra_headers=headers,
                        max_message_size=max_message_size,
                        message_queue_size=MESSAGE_QUEUE,
                        receive_buffer_size=RECEIVE_BYTES,
                    )
                    offer = (
                        Deflate(server_no_context_takeover=not events_context) if deflate else None
                    )
                    if offer is not None and ws._initial_request is not None:
                        ws._initial_request = dataclasses.replace(
                            ws._initial_request, extensions=[offer]
                        )
                    nursery.start_soon(ws._reader_task)
                    await ws._open_handshake.wait()
            except trio.TooSlowError:
                raise ConnectionTimeout from None
            except OSError as exc:
                raise HandshakeError from exc
            try:
                yield ClientSocket(ws, stream, offer)
            finally:
                # Not shielded: a cancelled owner (a killed socket) closes the stream at once.
                with trio.move_on_after(close_timeout):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        single = _single(group)
        raise single from single.__cause__  # keep why (a refused tunnel, a reset)
