"""What a socket's task does with what it hears: each frame to its lane's turn, and turns' ends.

Mixed into `UpstreamConnection` (upstream.py), whose task alone calls it: the frame routing by
lane (`stream_id`), steering answers and answers to relayed events, frames no running turn owns,
and how a turn, a lane or the whole socket ends. The connection's state it reads is declared
below for the type checker; upstream.py holds it and the task's I/O loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
import trio
from trio_websocket import ConnectionClosed

from trioproxy import errors
from trioproxy.awaiting import Awaiting, steer_refused, steer_target
from trioproxy.config import Settings
from trioproxy.connector import close_detail, closed_error
from trioproxy.delta import Conversation
from trioproxy.errors import ApiError
from trioproxy.events import (
    STEER_EVENTS,
    UpstreamEvent,
    error_of,
    parse_frame,
    response_id,
    without_lane,
)
from trioproxy.jobs import Job, Notice, Sink
from trioproxy.turn import EndKind, Turn, TurnEnd, TurnOverdue, broken_end, terminal_end
from trioproxy.wsclient import ClientSocket

# Ends after which the socket's state is unknown: close it at once, without a close handshake.
ABRUPT = frozenset({"socket", "timeout", "abandoned"})
# Upstream ends of one response that leave the connection as it was (on a named lane).
SOFT = frozenset({"error", "failed", "incomplete", "cancelled"})


class FrameRouting:
    """Routing and ends for `UpstreamConnection` (see the module's docstring)."""

    if TYPE_CHECKING:  # the connection's own, set in upstream.py
        shared: bool
        one_turn: bool
        turns: int
        sink: Sink | None
        memory: Conversation | None
        answered: deque[str]
        _settings: Settings
        _lanes: dict[str | None, deque[Turn]]
        _awaiting: Awaiting
        _outgoing: Job | None
        _last_sent: Job | None
        _last_frame: float
        _ending: bool
        _abrupt: bool
        _jobs_send: trio.MemorySendChannel[Job]
        _on_turn_end: Callable[[Any, Turn, TurnEnd], None]

        def running_turns(self) -> list[Turn]: ...
        def retire(self) -> None: ...
        def _settle(self, owner: object | None, *, tell: bool = True) -> None: ...

    def _notice_failed(self, job: Job, error: ApiError) -> None:
        """A relayed message that could not go: its client hears why, never silence."""
        notice = job if isinstance(job, Notice) else None
        sink = self.sink or (notice.sink if notice is not None else None)
        if sink is not None and notice is not None and notice.refusal is not None:
            sink.offer(notice.refusal)
        elif sink is not None:
            frame = orjson.dumps({"type": "error", "status": error.status, **error.body()})
            sink.offer(UpstreamEvent("error", frame.decode(), {}))
        if notice is not None:
            self._settle_notice(notice)
        else:
            self._settle(job.owner)

    @staticmethod
    def _steers(notice: Notice, turn: Turn) -> bool:
        """Whether a steering notice names this turn's response."""
        return notice.target is not None and named(turn.tracker.response) == notice.target

    async def _route(self, frame: str | bytes) -> bool:
        """One frame to the turn of its lane (`stream_id`), or to the attached client."""
        self._last_frame = trio.current_time()
        try:
            event = parse_frame(frame)
        except ValueError as exc:
            self._break_all("socket", errors.upstream_protocol(str(exc)))
            return False
        lane = event.data.get("stream_id")
        if event.type == "error" or event.type in STEER_EVENTS:
            answer = self._answer_of(event, lane)
            if answer is None:
                return True
            event, turn = answer
        else:
            queue = self._lanes.get(lane if isinstance(lane, str) else None)
            turn = queue[0] if queue else None
        if turn is None:
            return await self._unrouted(event)
        if turn is self._outgoing:
            # Read between the fragments of its own message (`_interleave`): no response can
            # answer a request not yet whole, so whatever this is, the lane's state is unknown.
            if not turn.discarding:
                early = errors.upstream_protocol("an event before its request was sent")
                self._cut(turn, broken_end("socket", early, turn.tracker))
            self.retire()
            return True
        if self.shared and isinstance(lane, str):
            event = without_lane(event)  # the lane is the proxy's, not the client's
            if event.type == "response.created":
                # Past 16 active responses the upstream queues a create: its time counts from
                # its start, not from the request.
                turn.deadline = trio.current_time() + self._settings.turn_timeout
        try:
            kind = turn.tracker.feed(event)
        except ValueError as exc:
            return self._broken(turn, errors.upstream_protocol(str(exc)))
        if turn.discarding:  # its client is gone: the response runs out unseen
            if kind is not None:
                self._remove(turn)
            return True
        released = kind is not None and event.type in STEER_EVENTS
        if kind is None or released:
            passed = await self._deliver(turn, event)
            if passed is not None:
                return passed
            if kind is None:
                return True
            held = turn.tracker.held_end
            assert held is not None
            event = held[1]  # steering settled: the end passed on earlier is the turn's end
        self._remove(turn)
        end = terminal_end(kind, event, turn.tracker, turn.plan)
        if released:
            end = replace(end, delivered=True)
        return self._end(turn, end)

    def _answer_of(
        self, event: UpstreamEvent, lane: Any
    ) -> tuple[UpstreamEvent, Turn | None] | None:
        """An `error` or a steering answer: the event as its turn takes it, and that turn (None:
        no running turn's); None when it was an answer to a notice and is dealt with."""
        laned = isinstance(lane, str)
        if self._awaiting and not laned and event.type == "error":
            notice = self._answered(event)
            if notice.target is None:
                return None
            event = steer_refused(notice, event)  # a steer refused: its answer, named
            if self._steered_by(event) is None:
                if notice.sink is not None:
                    notice.sink.offer(event)
                return None
        queue = self._lanes.get(lane if laned else None)
        turn = queue[0] if queue else None
        if event.type in STEER_EVENTS:
            settled = self._awaiting.steered(event)  # the steer it answers waits no more
            if settled is not None:
                self._settle_notice(settled)
            if not laned:
                # A steering answer without a lane belongs to the response it names, on
                # whichever lane that runs (on a shared socket no client hears the default
                # lane).
                turn = self._steered_by(event) or turn
        return event, turn

    def _broken(self, turn: Turn, error: ApiError) -> bool:
        """A turn's response broke the protocol: the socket's state is unknown. On a shared
        socket only that lane's is: that turn ends, the socket takes no new turns, the other
        lanes finish. False when the socket must close."""
        if not self._isolated(turn):
            self._break_all("socket", error)
            return False
        if not turn.discarding:
            self._cut(turn, broken_end("socket", error, turn.tracker))
        self.retire()
        return True

    async def _deliver(self, turn: Turn, event: UpstreamEvent) -> bool | None:
        """Hand an event to its turn's client: None once it is handed over; otherwise the turn
        could not take it and has ended (its client left, or stopped reading), and what
        `_route` returns (False: the socket must close)."""
        try:
            if not self._isolated(turn):
                await turn.deliver(event)
            elif not turn.offer(event):
                slow = errors.client_too_slow(turn.limit)
                self._cut(turn, broken_end("timeout", slow, turn.tracker))
                return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self._isolated(turn):
                self._cut(turn, TurnEnd("abandoned"))
                return True
            self._remove(turn)
            self._end(turn, TurnEnd("abandoned"))  # the client closed its end
            self._break_all("socket", errors.upstream_closed("socket closed by the proxy"))
            return False
        except TurnOverdue:
            # Its client stopped reading: the turn's own deadline still holds.
            if self._isolated(turn):
                timeout = errors.turn_timeout(self._settings.turn_timeout)
                self._cut(turn, broken_end("timeout", timeout, turn.tracker))
                return True
            self._break_all("timeout", errors.turn_timeout(self._settings.turn_timeout))
            return False
        return None

    def _steered_by(self, event: UpstreamEvent) -> Turn | None:
        """The running turn whose response a steering answer names, if any."""
        target = steer_target(event)
        if target is None:
            return None
        for turn in self.running_turns():
            if named(turn.tracker.response) == target or target in turn.tracker.earlier:
                return turn
        return None

    def _answered(self, event: UpstreamEvent) -> Notice:
        """An `error` on the default lane while relayed events (or steers on a shared socket)
        await their answers: the upstream takes messages in order, so it answers the oldest
        (a relayed event's goes to its client as it came; a steer's is for `_route` to name).
        Any other frame is routed as usual (a notice such as `codex.rate_limits` is no answer).
        The client sends nothing on the default lane meanwhile (wsturns.py), and on a shared
        socket no turn runs there, so no response's refusal can be taken for an answer."""
        notice = self._awaiting.oldest()
        if notice.target is None and self.sink is not None:
            self.sink.offer(event)
        self._settle_notice(notice)
        return notice

    def _settle_notice(self, notice: Notice) -> None:
        notice.settled.set()
        self._settle(notice.owner)

    async def _unrouted(self, event: UpstreamEvent) -> bool:
        """A frame no running turn owns. An attached client gets it as it came; without one a
        notice about no response is dropped, and anything about a response (or an error)
        means the socket's state is unknown. A stray `response.*` event closes the socket
        once nothing runs on it, client or not."""
        kind = event.type
        stray = kind == "error" or (kind.startswith("response.") and kind not in STEER_EVENTS)
        if self.sink is not None:
            self.sink.offer(event)  # never waits: a client that stops reading is closed
            if kind.startswith("response.") and kind not in STEER_EVENTS:
                self.retire()
            return True
        if stray and self.shared:
            return self._shared_stray(event)
        if stray:
            self._break_all(
                "socket", errors.upstream_protocol(f"`{kind}` arrived for no running response")
            )
            return False
        return True

    def _shared_stray(self, event: UpstreamEvent) -> bool:
        """A frame no running turn owns on a shared socket. On a named lane: that lane's
        state is unknown, not the others' (no new turns; the running ones finish). On the
        default lane: an `error` is the connection's (its turns end with it: its code, say
        `websocket_connection_limit_reached`, decides whether they are retried); a response
        event there while lanes run means the upstream ignores `stream_id`."""
        if isinstance(event.data.get("stream_id"), str):
            self.retire()
            return True
        if event.type == "error":
            self._break_all("socket", error_of(event))
        elif self._heard():
            self._break_all("socket", errors.lanes_ignored())
        else:
            self._break_all(
                "socket", errors.upstream_protocol(f"`{event.type}` arrived for no response")
            )
        return False

    def _remove(self, turn: Turn) -> None:
        queue = self._lanes.get(turn.lane)
        if queue and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._lanes[turn.lane]

    def _end(self, turn: Turn, end: TurnEnd) -> bool:
        """Record a turn's end (the pool learns first, then the client); False when the
        socket must close now."""
        turn.waker = None
        if self._last_sent is turn:
            self._last_sent = None  # an idle socket keeps nothing of its last turn
        self.turns += 1
        keep = end.kind == "completed" and not self.one_turn
        if turn.discarding:
            pass  # cut from a shared socket's lane: the others' state is untouched
        elif keep:
            self.memory = end.remembered
            rid = response_id(end.event) if end.event is not None else None
            if rid is not None:
                self.answered.append(rid)
        elif turn.lane is None or self.one_turn or end.kind not in SOFT:
            self._ending = True  # no more jobs; the turns running finish first
            self._jobs_send.close()
        else:
            # A named lane's response refused or failed: the protocol keeps the connection
            # and the other lanes' state (openai responses_websocket README), so does the pool.
            # But a refused same-lane continuation evicts its parent from the upstream's cache:
            # the socket no longer counts on the id it chained from (a fork's parent survives;
            # forgetting it too only costs a full send later, never a broken chain).
            self._forget_response(turn.plan.message.get("previous_response_id"))
        self._settle(turn.owner, tell=False)  # the pool hears of it with the end, next
        # By the time a client sees the end and sends its next request, this socket is
        # already idle and reusable.
        self._on_turn_end(self, turn, end)
        turn.finish(end)
        if end.kind in ABRUPT and not turn.discarding:
            self._abrupt = True
            return False
        return keep or not self._ending or bool(self._lanes)

    def _heard(self) -> bool:
        """Whether a client still hears a turn here (a cut turn's lane is only drained)."""
        return any(not turn.discarding for turn in self.running_turns())

    def _isolated(self, turn: Turn) -> bool:
        """Whether a turn can end alone: on a named lane of a shared socket, where the other
        lanes are other sessions' and the protocol keeps them apart."""
        return self.shared and turn.lane is not None

    def _cut(self, turn: Turn, end: TurnEnd) -> None:
        """End a shared socket's turn whose client is gone, and leave it on its lane until its
        response runs out (its frames are dropped; its lane is not given again before). The
        WebSocket protocol has no cancel for a running response."""
        turn.discarding = True
        self._end(turn, end)

    def _forget_response(self, rid: Any) -> None:
        if not isinstance(rid, str):
            return
        if self.memory is not None and self.memory.response_id == rid:
            self.memory = None
        if rid in self.answered:
            self.answered.remove(rid)

    def _closed(self, sock: ClientSocket, exc: ConnectionClosed) -> None:
        """The socket closed under its turns: each ends saying why. The upstream's 1009 answers
        the message going out, or else the last one sent: only that turn's request was too
        large (`closed_error`), the others' (other lanes of a shared socket) were not."""
        error = closed_error(sock, exc)
        if error.code == "upstream_message_too_large":
            # The message going out when the close came (the upstream reads past its limit
            # and closes before the rest is sent), else the last one sent.
            # A notice (a steer) too large is failed to its client with the others.
            culprit = self._outgoing or self._last_sent
            self._last_sent = None
            if isinstance(culprit, Turn) and culprit in self.running_turns():
                self._remove(culprit)
                self._end(culprit, broken_end("socket", error, culprit.tracker))
            error = errors.upstream_closed(close_detail(exc))
        self._break_all("socket", error)

    def _break_all(self, kind: EndKind, error: ApiError) -> None:
        """End every running turn with `error` (the socket is closing)."""
        self._ending = True
        self._jobs_send.close()
        for turn in self.running_turns():
            if not turn.discarding:  # a cut turn's client heard its end already
                self._end(turn, broken_end(kind, error, turn.tracker))
        self._lanes.clear()
        for notice in self._awaiting.drain():
            self._notice_failed(notice, error)  # its client hears the socket went
        self._abrupt = True


def named(response: dict[str, Any] | None) -> str | None:
    value = response.get("id") if response is not None else None
    return value if isinstance(value, str) else None
