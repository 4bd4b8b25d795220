"""One upstream Responses WebSocket, owned by exactly one task.

The task opens the socket, reports start-up through `task_status` (so a refused handshake
surfaces in the request that asked for the socket), then takes turns off its memory channel one
at a time. Each turn's events go back over the turn's own bounded channel; the turn's end is
stored on the turn and signalled by closing that channel, so the client side never races the
socket's return to the pool. Nothing but this task ever touches the socket.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
)

from trioproxy import errors
from trioproxy.config import Settings
from trioproxy.delta import Conversation
from trioproxy.errors import ApiError
from trioproxy.events import (
    parse_frame,
)
from trioproxy.metadata import client_metadata
from trioproxy.turn import Turn, TurnEnd, broken_end, terminal_end
from trioproxy.wsclient import ClientSocket, open_websocket

log = logging.getLogger("trioproxy.upstream")

Headers = list[tuple[bytes, bytes]]
Connector = Callable[[str, Headers], AbstractAsyncContextManager[ClientSocket]]

# Beyond connect_timeout, how long the client library may take to give up on its own.
_HANDSHAKE_SLACK = 0.5
# Ends after which the socket's state is unknown: close it at once, without a close handshake.
_ABRUPT = frozenset({"socket", "timeout", "abandoned"})


def websocket_connector(settings: Settings) -> Connector:
    """The production connector: a real (TLS where `wss://`) WebSocket client that offers
    permessage-deflate unless `settings.permessage_deflate` is off.

    Waiting for the upgrade's answer is bounded, but the client's reader task can stay blocked
    on an upstream that accepted TCP and never answers. An outer cancel scope bounds the whole
    handshake, reader included.
    """

    @asynccontextmanager
    async def connect(url: str, headers: Headers) -> AsyncIterator[ClientSocket]:
        deadline = trio.current_time() + settings.connect_timeout + _HANDSHAKE_SLACK
        with trio.CancelScope(deadline=deadline) as handshake:
            async with open_websocket(
                url,
                headers,
                deflate=settings.permessage_deflate,
                events_context=settings.deflate_events_context,
                connect_timeout=settings.connect_timeout,
                close_timeout=settings.close_timeout,
                max_message_size=settings.max_message_bytes,
            ) as sock:
                handshake.deadline = math.inf
                yield sock
        if handshake.cancelled_caught:
            raise ConnectionTimeout

    return connect


_ids = itertools.count(1)


class UpstreamConnection:
    """An upstream socket's task and the state the registry reads (all touched by one thread)."""

    def __init__(
        self,
        *,
        key: str | None,
        url: str,
        headers: list[tuple[str, str]],
        settings: Settings,
        on_turn_end: Callable[[UpstreamConnection, Turn, TurnEnd], None],
        on_exit: Callable[[UpstreamConnection], None],
    ) -> None:
        self.id = next(_ids)
        self.key = key
        self.group: str | None = None  # set for sockets of requests that name no session
        self.url = url
        self.one_turn = key is None
        # Latin-1 both ways: header values arrive decoded as latin-1 and leave byte-identical.
        self._handshake: Headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        self._settings = settings
        self._on_turn_end = on_turn_end
        self._on_exit = on_exit
        self.born = trio.current_time()
        self.last_used = self.born
        self.busy = True
        self.memory: Conversation | None = None
        self.answered: deque[str] = deque(maxlen=8)  # ids of the last responses completed here
        self.turns = 0
        self.current: Turn | None = None  # the turn in progress
        self.deflate = False  # whether the upstream accepted permessage-deflate
        # The upgrade answer's headers a client reads (rate limits, model): every turn's too.
        self.response_headers: list[tuple[str, str]] = []
        self._scope = trio.CancelScope()
        self._turns_send, self._turns_recv = trio.open_memory_channel[Turn](1)
        self.closed = trio.Event()

    def __repr__(self) -> str:
        kind = "one-turn" if self.one_turn else f"key={self.key}"
        return f"<UpstreamConnection #{self.id} {kind} turns={self.turns}>"

    def submit(self, turn: Turn) -> bool:
        """Hand a turn to the socket's task; False when the task has already gone."""
        try:
            self._turns_send.send_nowait(turn)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def retire(self) -> None:
        """Close gracefully once idle: the task sees its channel end and closes the socket."""
        self._turns_send.close()

    def kill(self) -> None:
        """Close now, whatever it is doing: used when its state can no longer be trusted."""
        self._turns_send.close()
        self._scope.cancel()

    async def run(
        self, connector: Connector, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            with self._scope:
                async with connector(self.url, self._handshake) as sock:
                    started = True
                    self.deflate = sock.deflate
                    self.response_headers = client_metadata(sock.ws.handshake_headers)
                    task_status.started()
                    await self._serve(sock)
        except Exception as exc:
            if not started:
                raise handshake_error(exc) from exc
            # After start-up nothing may escape into the registry's nursery: the turn in
            # progress has been finished with an error already, so log and let the socket go.
            log.info("upstream socket #%d closed with %r", self.id, exc)
        finally:
            self._turns_send.close()
            self._fail_queued()
            self._turns_recv.close()
            self._on_exit(self)
            self.closed.set()

    def _fail_queued(self) -> None:
        """A turn handed over just before the task ended still gets an end, never a hang."""
        while True:
            try:
                turn = self._turns_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            turn.finish(TurnEnd("socket", error=errors.upstream_closed("socket closed")))

    async def _serve(self, sock: ClientSocket) -> None:
        while (turn := await self._next_turn(sock)) is not None:
            if not await self._take(sock, turn):
                return
            # Let go of the turn before waiting for the next: an idle socket must not keep the
            # last request, its payload and its parsed events alive (hundreds of KB for Codex).
            del turn

    async def _next_turn(self, sock: ClientSocket) -> Turn | None:
        """The next turn, or None once the pool retires this socket. A socket idle longer than
        `deflate_hold` gives back its compressor: a tool loop's turns follow each other within
        seconds and keep the context; a pool of idle sessions does not pay ~200 KiB each."""
        try:
            if sock.compressing:
                with trio.move_on_after(self._settings.deflate_hold):
                    return await self._turns_recv.receive()
                sock.release_compression()
            return await self._turns_recv.receive()
        except trio.EndOfChannel:
            return None

    async def _take(self, sock: ClientSocket, turn: Turn) -> bool:
        """Run one turn; False when the socket must not take another."""
        self.current = turn
        try:
            end = await self._exchange(sock, turn)
        except BaseException:
            # Even when this task is cancelled (shutdown, eviction) the client hears an end.
            closed = errors.upstream_closed("socket closed by the proxy")
            turn.finish(broken_end("socket", closed, turn.tracker))
            raise
        keep = end.kind == "completed" and not self.one_turn
        self.current = None
        self.turns += 1
        if keep:
            self.memory = end.remembered
            if turn.tracker.response is not None:
                self.answered.append(str(turn.tracker.response.get("id")))
        # The pool learns first, then the client: by the time a client sees the end and
        # sends its next request, this socket is already idle and reusable.
        self._on_turn_end(self, turn, end)
        turn.finish(end)
        if not keep and end.kind in _ABRUPT:
            self._scope.cancel()
        return keep

    async def _exchange(self, sock: ClientSocket, turn: Turn) -> TurnEnd:
        ws, tracker = sock.ws, turn.tracker
        with turn.scope:
            with trio.move_on_after(self._settings.turn_timeout):
                if ws.closed is not None:
                    return TurnEnd("socket", error=errors.upstream_closed("closed while idle"))
                if self._spoke_while_idle(sock):
                    # Whatever it was (a late event, an error), it is no turn's: the socket's
                    # state is unknown. The turn goes on a fresh socket, unseen by the client.
                    stray = errors.upstream_protocol("a frame arrived while the socket was idle")
                    return TurnEnd("socket", error=stray)
                tracker.stale = self.answered
                try:
                    before = sock.wire.sent
                    await sock.send_text(turn.payload)
                    turn.wire_bytes = sock.wire.sent - before
                    # One scope for the whole turn, armed only while waiting for a frame (a
                    # slow client's back-pressure is not upstream silence): cheaper per event
                    # than entering a fresh `move_on_after`. Frames already queued by the
                    # reader are taken without waiting, so a burst touches neither the
                    # deadline nor the scheduler (at most the reader's queue between waits).
                    with trio.CancelScope() as silence:
                        while True:
                            try:
                                frame = sock.message_nowait()
                            except trio.WouldBlock:
                                silence.deadline = trio.current_time() + self._settings.read_timeout
                                frame = await ws.get_message()
                                silence.deadline = math.inf
                            event = parse_frame(frame)
                            kind = tracker.feed(event)
                            if kind is not None:
                                return terminal_end(kind, event, tracker, turn.plan)
                            await turn.deliver(event)
                    silent = errors.upstream_silent(self._settings.read_timeout)
                    return broken_end("timeout", silent, tracker)
                except ConnectionClosed as exc:
                    return broken_end("socket", errors.upstream_closed(_close_detail(exc)), tracker)
                except ValueError as exc:
                    return broken_end("socket", errors.upstream_protocol(str(exc)), tracker)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return TurnEnd("abandoned")  # the client closed its end of the channel
            return broken_end("timeout", errors.turn_timeout(self._settings.turn_timeout), tracker)
        return TurnEnd("abandoned")

    @staticmethod
    def _spoke_while_idle(sock: ClientSocket) -> bool:
        """Whether the upstream sent anything about a response since the last turn ended:
        a `response.*` event, an `error`, anything unreadable. A notice that concerns no
        response (`codex.rate_limits`, say) is dropped: it would otherwise turn every reuse
        into a full resend on a fresh socket."""
        while True:
            try:
                frame = sock.message_nowait()
            except trio.WouldBlock:
                return False
            except ConnectionClosed:
                return True
            try:
                kind = parse_frame(frame).type
            except ValueError:
                return True
            if kind == "error" or kind.startswith("response."):
                return True


def _close_detail(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"code {reason.code}" + (f" ({reason.reason})" if reason.reason else "")


def handshake_error(exc: BaseException) -> ApiError:
    """Map a failed connect or upgrade to the error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConnectionRejected):
        return errors.from_handshake_rejection(exc.status_code, exc.body)
    if isinstance(exc, ConnectionTimeout):
        return errors.upstream_unreachable("the handshake timed out")
    if isinstance(exc, HandshakeError) and exc.__cause__ is not None:
        return errors.upstream_unreachable(str(exc.__cause__) or type(exc.__cause__).__name__)
    return errors.upstream_unreachable(str(exc) or type(exc).__name__)
