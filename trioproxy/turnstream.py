"""The client's side of a turn, and where large requests are worked on.

`TurnStream` is what a surface (HTTP turns, WebSocket turns) iterates: the turn's first event,
then the rest, then its end. `off_loop` moves the work on a large request (parsing, planning)
to a worker thread so the event loop keeps serving everyone else.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from trioproxy.events import UpstreamEvent
from trioproxy.turn import Turn, TurnEnd
from trioproxy.upstream import UpstreamConnection

T = TypeVar("T")

# Above this request size, parsing and planning run in a worker thread: a 30 MB input of half a
# million items takes seconds to digest, and on the event loop every other client would wait.
OFF_LOOP_BYTES = 1 << 20


class TurnStream:
    """The client's side of one turn: its events in order, then `end`.

    `aclose` is synchronous at heart, so it still works from a `finally` under cancellation:
    a turn whose client goes away is cancelled and its socket evicted.
    """

    def __init__(
        self, turn: Turn, first: UpstreamEvent | None, conn: UpstreamConnection | None = None
    ) -> None:
        self.turn = turn
        self.first = first
        self.conn = conn  # the upstream socket it runs on (None over HTTP)
        self._pending = first

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> UpstreamEvent:
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        try:
            return await self.turn.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def next_nowait(self) -> UpstreamEvent:
        """The next event if one is already buffered; `trio.WouldBlock` if none is yet,
        `StopAsyncIteration` once the turn has ended."""
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        try:
            return self.turn.receive_nowait()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    @property
    def end(self) -> TurnEnd:
        assert self.turn.end is not None, "end is known once the events are exhausted"
        return self.turn.end

    def abandon(self) -> None:
        self.turn.abandon()
        self.turn.events.close()
        self.turn.buffered_bytes = 0  # its buffered events went with the channel

    async def aclose(self) -> None:
        self.abandon()


# While a worker thread holds the GIL, the event loop waits up to the switch interval every
# time it wants it back, and answering one request wants it a dozen times: at Python's 5 ms
# a health check took 100-165 ms during a 12 MB turn. With one thread (nearly always) the
# interval costs nothing.
SWITCH_INTERVAL = 0.0005


async def off_loop(size: int, work: Callable[..., T], *args: Any) -> T:
    """`work(*args)`, in a worker thread when the request is large (`OFF_LOOP_BYTES`): the
    event loop keeps serving other clients, taking the GIL back every `SWITCH_INTERVAL`."""
    if size <= OFF_LOOP_BYTES:
        return work(*args)
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)
    return await trio.to_thread.run_sync(work, *args)
