"""One turn: what it sends, the channel its events take to the client, and how it ended.

A `Turn` is what a request hands the socket's task over the memory channel: its planned message,
a bounded channel (in events and in bytes) for its events, and its own cancel scope, so the
client's side can abandon it wherever it is. Its end is recorded on the turn and signalled by
closing the channel, so the client never races the socket's return to the pool. The HTTP
fallback runs the same object over HTTP.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
import trio

from trioproxy.delta import Conversation, TurnPlan
from trioproxy.errors import ApiError
from trioproxy.events import EndKind as UpstreamEnd
from trioproxy.events import TurnTracker, UpstreamEvent, error_of, response_id

if TYPE_CHECKING:  # lanes.py imports the socket's task, which imports this
    from trioproxy.lanes import Seat

# How a turn can end: as upstream ended it, or as the proxy had to.
EndKind = Literal[UpstreamEnd, "socket", "timeout", "abandoned"]


@dataclass(frozen=True, slots=True)
class TurnEnd:
    """How a turn ended, and what the client and the pool need to know about it."""

    kind: EndKind
    event: UpstreamEvent | None = None  # the terminal upstream event, if there was one
    error: ApiError | None = None  # set for `error`, `socket`, `timeout`
    next_sequence: int = 0  # sequence number for an error event the proxy appends
    remembered: Conversation | None = None  # the socket's memory after a completed turn
    begun: dict[str, Any] | None = None  # the Response the client saw created, if any
    # The terminal event already went to the client as an ordinary event: steering kept the
    # turn open after it, and the end came with a later steering answer.
    delivered: bool = False


class TurnOverdue(Exception):
    """The turn's deadline passed while its client was not reading."""


class Turn:
    """One request's turn: the message to send, its event channel, and its cancel scope."""

    def __init__(
        self,
        plan: TurnPlan,
        buffer: int,
        *,
        request_id: str = "",
        request_bytes: int = 0,
        transport: str = "websocket",
        tenant: str | None = None,
        payload: bytes | None = None,
        placement: str = "new",
        buffer_bytes: int = 4 * 1024 * 1024,
        client: str = "http-in",
        channel: str | None = None,
        owner: object | None = None,
    ) -> None:
        self.plan = plan
        self.client = client  # how the request came in: `http-in` or `websocket-in`
        self.channel = channel  # managed mode: the channel it went to
        # Its own id: a client's request id repeats (Codex sends one per session).
        self.turn_id = f"turn_{uuid.uuid4().hex[:16]}"
        self.started = trio.current_time()
        self.first_event_at: float | None = None
        self.request_id = request_id
        self.placement = placement  # how the turn found its socket (registry.Placement)
        # The upstream's response metadata for the client's answer (see metadata.py); set
        # before the first event is delivered.
        self.response_headers: list[tuple[str, str]] = []
        self.tenant = tenant  # managed mode: the scope of the key that sent it
        self.request_bytes = request_bytes  # the client's body: what a full send would cost
        self.transport = transport
        encoded = orjson.dumps(plan.message) if payload is None else payload
        self.sent_bytes = len(encoded)
        # What the turn cost on the wire: the frame after permessage-deflate (set once sent),
        # or the HTTP body.
        self.wire_bytes = self.sent_bytes if transport == "http" else 0
        self.payload = encoded  # UTF-8 JSON: a text frame's content, or the HTTP body
        self.scope = trio.CancelScope()
        self.owner = owner  # the WebSocket client of ours that sent it, if any
        # Its WebSocket lane: the client's `stream_id`, None for the default lane.
        lane = plan.message.get("stream_id")
        self.lane: str | None = lane if isinstance(lane, str) else None
        # Its seat with lanes on (lanes.py), for the pool to update when the turn ends.
        self.seat: Seat | None = None
        # Cut from a shared socket: its client heard its end; its response runs out unseen.
        self.discarding = False
        # Set by the socket's task while the turn runs there: wakes it when the client leaves.
        self.waker: Callable[[], None] | None = None
        self.deadline = math.inf  # `turn_timeout` after the socket's task sent it
        self.tracker = TurnTracker()  # what the client has been told so far
        self._send, self.events = trio.open_memory_channel[UpstreamEvent](buffer)
        # The buffer is bounded in bytes as well as events: the socket's task waits while the
        # client holds more than `buffer_bytes` unread (one event of any size always passes).
        self._limit = buffer_bytes
        self.buffered_bytes = 0
        self._taken: trio.Event | None = None  # set while the socket's task waits for room
        self.end: TurnEnd | None = None

    async def deliver(self, event: UpstreamEvent) -> None:
        """Hand an event to the client's side; waits only when its buffer is full (in events
        or bytes). Not a checkpoint otherwise: the socket's task checkpoints at every wait for
        a frame, and a yield per event would hand the client one event per write."""
        size = len(event.raw)
        while self.buffered_bytes and self.buffered_bytes + size > self._limit:
            if self.scope.cancel_called:  # abandoned while the socket's task waited here
                raise trio.BrokenResourceError
            self._taken = trio.Event()
            try:
                with trio.move_on_at(self.deadline) as waited:
                    await self._taken.wait()
            finally:
                self._taken = None
            if waited.cancelled_caught:
                raise TurnOverdue
        self.buffered_bytes += size
        try:
            self._send.send_nowait(event)
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_at(self.deadline):
            await self._send.send(event)
            return
        raise TurnOverdue

    def offer(self, event: UpstreamEvent) -> bool:
        """Hand an event over without waiting; False when its buffer is full. A shared socket
        (lanes) delivers this way: waiting for one slow client would stall every lane."""
        size = len(event.raw)
        if self.buffered_bytes and self.buffered_bytes + size > self._limit:
            return False
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            return False
        self.buffered_bytes += size
        return True

    @property
    def limit(self) -> int:
        return self._limit

    async def receive(self) -> UpstreamEvent:
        """The client's side: the next event (`trio.EndOfChannel` after the last)."""
        return self._took(await self.events.receive())

    def receive_nowait(self) -> UpstreamEvent:
        """The next event if one is buffered, else `trio.WouldBlock`."""
        return self._took(self.events.receive_nowait())

    def _took(self, event: UpstreamEvent) -> UpstreamEvent:
        self.buffered_bytes -= len(event.raw)
        if self._taken is not None:  # only when the socket's task waits: not per event
            self._taken.set()
        return event

    @property
    def buffered(self) -> int:
        """Events relayed from the socket that the client has not read yet (bounded)."""
        return self._send.statistics().current_buffer_used

    def finish(self, end: TurnEnd) -> None:
        """Record the end and close the event channel: the reader sees the end after the events."""
        if self.end is None:
            self.end = end
            self._send.close()

    def abandon(self) -> None:
        """The client is gone: cancel the turn wherever it is (a no-op once it has ended)."""
        if self.end is None:
            self.scope.cancel()
            if self._taken is not None:
                self._taken.set()
            if self.waker is not None:
                self.waker()


def broken_end(kind: EndKind, error: ApiError, tracker: TurnTracker) -> TurnEnd:
    """A turn the proxy had to end: the error, and what the client was already told."""
    return TurnEnd(kind, error=error, next_sequence=tracker.next_sequence, begun=tracker.response)


def terminal_end(
    kind: UpstreamEnd, event: UpstreamEvent, tracker: TurnTracker, plan: TurnPlan
) -> TurnEnd:
    """A turn the upstream ended; a completed one leaves the socket's new memory."""
    if kind == "error":
        return TurnEnd(
            "error", event, error_of(event), tracker.next_sequence, begun=tracker.response
        )
    remembered = None
    rid = response_id(event)
    # After a steered response the conversation is the upstream's (queued steering input
    # went into a successor): the socket remembers no items, only the id (pass-through).
    if kind == "completed" and rid is not None and not tracker.successors:
        remembered = plan.remember(*tracker.output_forms(event), rid)
    return TurnEnd(kind, event, None, tracker.next_sequence, remembered)
