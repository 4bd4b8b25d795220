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
from collections import Counter, deque
from collections.abc import Callable
from functools import partial

import trio
from trio_websocket import ConnectionClosed

from trioproxy import errors
from trioproxy.awaiting import Awaiting
from trioproxy.config import Settings
from trioproxy.connector import Connector, Headers, handshake_error
from trioproxy.delta import Conversation
from trioproxy.events import parse_frame
from trioproxy.jobs import Job, Notice, Sink
from trioproxy.metadata import client_metadata
from trioproxy.routing import FrameRouting
from trioproxy.turn import Turn, TurnEnd, broken_end
from trioproxy.wsclient import ClientSocket

log = logging.getLogger("trioproxy.upstream")

# How long a shared socket's owner waits for the other lanes' bytes between the fragments of
# a long message it sends (`_interleave`): a read takes what is there; silence costs this.
INTERLEAVE_WAIT = 0.001

_ids = itertools.count(1)


class UpstreamConnection(FrameRouting):
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
        on_settled: Callable[[UpstreamConnection], None] = lambda conn: None,
        shared: bool = False,
    ) -> None:
        self.id = next(_ids)
        self.key = key
        # Sessions share it, each on a named lane of the proxy's (lanes.py): a turn's client
        # leaving ends only that turn, whose response runs out on its lane unseen, and the
        # lane names never reach a client.
        self.shared = shared
        self.group: str | None = None  # set for sockets of requests that name no session
        self.url = url
        self.one_turn = key is None
        # Latin-1 both ways: header values arrive decoded as latin-1 and leave byte-identical.
        self._handshake: Headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
        self._settings = settings
        self._on_turn_end = on_turn_end
        self._on_exit = on_exit
        self._on_settled = on_settled
        self.born = trio.current_time()
        self.last_used = self.born
        self.busy = True
        self.memory: Conversation | None = None
        # Ids of the last responses completed here: what a client may chain from on this
        # socket (lanes each have their own latest; 32 named lanes per connection).
        self.answered: deque[str] = deque(maxlen=32)
        self.turns = 0
        # Turns in progress by lane (None: the default lane), each lane first-in first-out.
        self._lanes: dict[str | None, deque[Turn]] = {}
        self.pending = 0  # jobs submitted and not finished: the pool keeps the socket busy
        self._queued = 0  # jobs submitted and not yet taken by the task
        # Whose jobs are pending (a WebSocket client of ours): only that client may join it.
        self._owners: Counter[object] = Counter()
        self.sink: Sink | None = None
        self._wake: trio.CancelScope | None = None
        self._sending: trio.CancelScope | None = None  # while a message goes out
        # Relayed events the upstream may still answer (on the default lane, in order), each
        # with the time after which it is taken as answered by silence.
        self._awaiting = Awaiting()
        self._left = False  # a turn's client left: look for abandoned turns
        self._ending = False  # takes no more jobs; closes once its turns end
        self._last_frame = self.born
        self._abrupt = False  # its state is unknown: close without a close handshake
        self.failure_counted = False  # the HTTP fallback heard of its failure already
        self.deflate = False  # whether the upstream accepted permessage-deflate
        # The upgrade answer's headers a client reads (rate limits, model): every turn's too.
        self.response_headers: list[tuple[str, str]] = []
        self._scope = trio.CancelScope()
        self._sock: ClientSocket | None = None  # while open: only `kill` reaches in (abort)
        self._last_sent: Job | None = None  # the job whose message went out last
        self._outgoing: Job | None = None  # the job whose message is going out now
        # Bounded: a WebSocket client of ours submits at most a few jobs ahead (wsturns.py).
        self._jobs_send, self._jobs_recv = trio.open_memory_channel[Job](64)
        self.closed = trio.Event()

    def __repr__(self) -> str:
        kind = "one-turn" if self.one_turn else f"key={self.key}"
        return f"<UpstreamConnection #{self.id} {kind} turns={self.turns}>"

    def submit(self, job: Job, *, joining: object | None = None) -> bool:
        """Hand a turn (or a notice) to the socket's task; False when it takes no more.

        A socket may carry several turns at once, one per WebSocket lane (the client's
        `stream_id`): a client of ours that runs lanes submits the next while one runs.
        `joining`: only while that owner's own jobs are still pending here (otherwise the
        pool may already have lent the socket to someone else)."""
        if self._ending or (joining is not None and not self._owners[joining]):
            return False
        try:
            self._jobs_send.send_nowait(job)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._pend(job.owner)
        self._queued += 1
        self._wake_up()
        return True

    def owned_by(self, owner: object) -> bool:
        """Whether `owner` has jobs pending here (or holds it)."""
        return self.accepting and self._owners[owner] > 0

    def hold(self, owner: object) -> None:
        """Leased with no turn (a client relays an event): busy until `unhold`."""
        self._pend(owner)

    def unhold(self, owner: object) -> None:
        self._settle(owner)

    def _pend(self, owner: object | None) -> None:
        self.pending += 1
        if owner is not None:
            self._owners[owner] += 1

    def _settle(self, owner: object | None, *, tell: bool = True) -> None:
        """A job is over. Once none is pending the attached client is let go at once, in step
        with the pool taking the socket back (told here unless a turn's end tells it): an
        idle socket's frames are no client's."""
        self.pending -= 1
        if owner is not None:
            self._owners[owner] -= 1
            if self._owners[owner] <= 0:
                del self._owners[owner]
        if not self.pending:
            if self.sink is not None:
                self.sink = None
                self._wake_up()
            if tell:
                self._on_settled(self)

    def attach(self, sink: Sink) -> None:
        """A WebSocket client of ours receives the frames that belong to no running turn
        (answers to its steering and to events this proxy does not know, connection-level
        errors) while its jobs are pending here; the socket's task then reads all the time."""
        if self.pending:
            self.sink = sink
            self._wake_up()

    @property
    def accepting(self) -> bool:
        """Whether it takes more jobs (not retired, not closing)."""
        return not self._ending

    def running_turns(self) -> list[Turn]:
        """Turns in progress on this socket, over all its lanes."""
        return [turn for queue in self._lanes.values() for turn in queue]

    def busy_lanes(self) -> set[str]:
        """Named lanes with a response running (a cut turn's included, until it ends)."""
        return {lane for lane in self._lanes if lane is not None}

    def retire(self) -> None:
        """Close gracefully once idle: the task sees its channel end and closes the socket."""
        self._jobs_send.close()
        self._ending = True
        self._wake_up()

    def kill(self) -> None:
        """Close now, whatever it is doing: used when its state can no longer be trusted."""
        self.retire()
        self._scope.cancel()
        if self._sock is not None:
            self._sock.abort()  # a pong shielded from the waits is not shielded from this

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.cancel()

    def _abandoned(self) -> None:
        """A turn's client left: its waker. A message half sent is cut too, unless the socket
        is shared: a message cut halfway breaks the socket, and the other lanes with it."""
        self._left = True
        self._wake_up()
        if self._sending is not None and not self.shared:
            self._sending.cancel()

    async def run(
        self, connector: Connector, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            with self._scope:
                async with connector(self.url, self._handshake) as sock:
                    self._sock = sock
                    started = True
                    self.deflate = sock.deflate
                    self.response_headers = client_metadata(sock.handshake_headers)
                    task_status.started()
                    await self._serve(sock)
        except Exception as exc:
            if not started:
                raise handshake_error(exc) from exc
            # After start-up nothing may escape into the registry's nursery: the turns in
            # progress have been finished with an error already, so log and let the socket go.
            log.info("upstream socket #%d closed with %r", self.id, exc)
        finally:
            self._sock = None
            self._ending = True
            self._jobs_send.close()
            # Even when this task is cancelled (shutdown, eviction) every client hears an end.
            closed = errors.upstream_closed("socket closed by the proxy")
            for turn in self.running_turns():
                turn.finish(broken_end("socket", closed, turn.tracker))
            self._lanes.clear()
            for notice in self._awaiting.drain():  # no answer will come: their clients hear why
                self._notice_failed(notice, closed)
            self._fail_queued()
            self._jobs_recv.close()
            self._on_exit(self)
            self.closed.set()

    def _fail_queued(self) -> None:
        """A turn handed over just before the task ended still gets an end, never a hang."""
        while True:
            try:
                job = self._jobs_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            closed = errors.upstream_closed("socket closed")
            if isinstance(job, Turn):
                job.finish(TurnEnd("socket", error=closed))
            else:
                self._notice_failed(job, closed)  # never sent: its client hears so

    async def _serve(self, sock: ClientSocket) -> None:
        """Idle: wait for a job, reading meanwhile (pings, a close, a stray frame).
        Busy, or with a client attached: read frames and route them (`_pump`)."""
        while True:
            if not self._lanes and self.sink is None:
                job = await self._next_job(sock)
                if job is True:
                    continue  # a client attached: its frames are read by `_pump`
                if job is False or not await self._begin(sock, job, idle=True):
                    break
                # Let go of the job before waiting for the next: an idle socket must not keep
                # the last request, its payload and its parsed events alive.
                del job
            elif not await self._pump(sock):
                break
        if self._abrupt:
            self._scope.cancel()

    async def _next_job(self, sock: ClientSocket) -> Job | bool:
        """The next job; True once a client attached (`attach`) with none queued; False once
        the pool retires this socket or it cannot serve again.

        No one else reads, so the wait is a read that a new job cancels (`_wake_up`): an
        idle socket answers pings and hears a close when it comes. A frame about a response
        or an `error` while idle leaves the socket's state unknown, so it closes at once; the
        session's next turn goes on a fresh socket. A socket idle longer than `deflate_hold`
        gives back its compressor: a tool loop's turns follow each other within seconds and
        keep the context; a pool of idle sessions does not pay ~200 KiB each."""
        hold = trio.current_time() + self._settings.deflate_hold if sock.compressing else math.inf
        while True:
            try:
                return self._took(self._jobs_recv.receive_nowait())
            except trio.WouldBlock:
                pass
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return False
            if self.sink is not None:
                return True
            # Judged before each wait, not only after a read: frames the last turn's read
            # brought behind its end are queued already.
            if sock.closed is not None:
                log.info("upstream socket #%d closed while idle (%s)", self.id, sock.closed)
                return False
            if self._spoke_while_idle(sock):
                log.info("upstream socket #%d: a frame about a response while idle", self.id)
                self._abrupt = True  # its state is unknown: no close handshake
                return False
            if trio.current_time() >= hold:
                sock.release_compression()
                hold = math.inf
            with trio.CancelScope(deadline=hold) as wait:
                self._wake = wait
                try:
                    await sock.read_some()
                except ConnectionClosed:
                    return False
                finally:
                    self._wake = None

    def _took(self, job: Job) -> Job:
        self._queued -= 1
        return job

    async def _begin(self, sock: ClientSocket, job: Job, *, idle: bool = False) -> bool:
        """Send a job's message; False when the socket must close."""
        turn = job if isinstance(job, Turn) else None
        if idle and (sock.closed is not None or self._spoke_while_idle(sock)):
            # Whatever it was (a late event, an error), it is no turn's: the socket's state is
            # unknown. The turn goes on a fresh socket, unseen by the client.
            error = (
                errors.upstream_closed("closed while idle")
                if sock.closed is not None
                else errors.upstream_protocol("a frame arrived while the socket was idle")
            )
            if turn is None:
                self._notice_failed(job, error)
                self._abrupt = True
            else:
                self._end(turn, TurnEnd("socket", error=error))
            return False
        if turn is None:
            assert isinstance(job, Notice)
            # (Not a turn whose client left: nobody would read the steered successor.)
            steered = [
                t
                for t in self.running_turns()
                if self._steers(job, t) and not (t.discarding or t.scope.cancel_called)
            ]
            if job.target is not None and self.shared and (not steered or self._awaiting.steering):
                # Its response ended meanwhile: an answer would come on a lane that another
                # session's turn may hold by then, so it is not sent; its client hears so. Nor
                # while another steer awaits its answer: a lane-less `error` must answer exactly
                # one steer, or one session's refusal could reach another (review 43).
                self._notice_failed(job, errors.upstream_closed("response ended"))
                return True
            for running in steered:
                running.tracker.steer_sent()
            self._outgoing = job
            try:
                sent = await self._send(sock, job.payload, self._send_deadline())
            finally:
                self._outgoing = None
            if not sent:
                self._notice_failed(job, errors.upstream_closed("closed while sending"))
            elif job.target is None or self.shared:
                # An event this proxy does not know: its answer, if any, comes on the default
                # lane before anything sent after it; it stays the client's until then, or
                # until `ANSWER_WAIT` of silence says it was taken without one. So does a
                # steer on a shared socket: an `error` without a lane that answers it must
                # reach its client, not end every session's turn as the connection's error.
                self._last_sent = job
                self._awaiting.add(job, trio.current_time())
            else:
                self._last_sent = job
                self._settle_notice(job)
            return sent
        if turn.scope.cancel_called:  # its client left before it was sent
            if self._isolated(turn):
                turn.discarding = True  # nothing was sent: only this turn ends
                return self._end(turn, TurnEnd("abandoned"))
            self._end(turn, TurnEnd("abandoned"))
            return False
        turn.tracker.stale = self.answered
        turn.waker = self._abandoned
        turn.deadline = trio.current_time() + self._settings.turn_timeout
        self._last_frame = trio.current_time()  # silence counts from the request
        self._lanes.setdefault(turn.lane, deque()).append(turn)
        before = sock.wire.sent
        self._outgoing = turn
        try:
            if not await self._send(sock, turn.payload, self._send_deadline()):
                return False
        finally:
            self._outgoing = None
        turn.wire_bytes = sock.wire.sent - before
        self._last_sent = turn  # what an upstream 1009 close answers (`_closed`)
        return True

    def _send_deadline(self) -> float:
        """A send may last until the earliest running turn's deadline (a new turn's own, or
        `turn_timeout` from now): never past a deadline already set."""
        default = trio.current_time() + self._settings.turn_timeout
        return min([default, *(turn.deadline for turn in self.running_turns())])

    async def _send(self, sock: ClientSocket, payload: bytes, deadline: float) -> bool:
        """One message out, bounded by `deadline` and cut by a client leaving: an upstream
        that stops reading cannot hold a turn past its `turn_timeout`. A message cut halfway
        leaves the socket unusable, so every turn on it ends."""
        between = partial(self._interleave, sock) if self.shared else None
        with trio.CancelScope(deadline=deadline) as sending:
            self._sending = sending
            try:
                await sock.send_text(payload, between)
                return True
            except ConnectionClosed as exc:
                self._closed(sock, exc)
                return False
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._break_all("socket", errors.upstream_closed("closed while sending"))
                return False
            finally:
                self._sending = None
        if self._left:
            self._drop_abandoned()
        self._break_all("timeout", errors.turn_timeout(self._settings.turn_timeout))
        return False

    async def _interleave(self, sock: ClientSocket) -> bool:
        """Between the fragments of a long message on a shared socket: what the other lanes
        sent meanwhile is read and routed, so one session's large request over a slow uplink
        does not hold back every other session's events until it is sent. False once the
        socket must close."""
        if len(self.running_turns()) <= 1:  # only the turn being sent: nothing to read for
            await trio.lowlevel.checkpoint()
            return True
        try:
            await sock.read_ready(INTERLEAVE_WAIT)
            while True:
                try:
                    frame = sock.message_nowait()
                except trio.WouldBlock:
                    return True
                if not await self._route(frame):
                    return False
        except ConnectionClosed as exc:
            self._closed(sock, exc)
            return False

    async def _pump(self, sock: ClientSocket) -> bool:
        """Read frames and hand each to its lane's turn until no turn runs and no client is
        attached; False when the socket must close.

        Frames a read already completed are taken without waiting, so a burst touches
        neither a deadline nor the scheduler. Only the wait for a frame is bounded (silence,
        each turn's deadline) and woken early by a new job or a client leaving: a slow
        client's back-pressure is not upstream silence.
        """
        while self._lanes or self.sink is not None or self._awaiting:
            if self._queued and not await self._take_jobs(sock):
                return False
            if self._left and not self._drop_abandoned():
                return False
            if self._ending and not self._heard():
                return False
            try:
                frame = sock.message_nowait()
            except trio.WouldBlock:
                got = await self._wait_frame(sock)
                if got is None:
                    if self._ending and not self._heard():
                        return False
                    if not self._check_deadlines():
                        return False
                    continue
                frame = got
            except ConnectionClosed as exc:
                self._closed(sock, exc)
                return False
            if not await self._route(frame):
                return False
        return not self._ending

    async def _take_jobs(self, sock: ClientSocket) -> bool:
        while True:
            try:
                job = self._jobs_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return True
            self._queued -= 1
            if not await self._begin(sock, job):
                return False

    async def _wait_frame(self, sock: ClientSocket) -> str | bytes | None:
        """The next frame, or None when a deadline passed or something woke the task."""
        deadline = math.inf
        if self._lanes:
            deadline = trio.current_time() + self._settings.read_timeout
            deadline = min([deadline, *(t.deadline for t in self.running_turns())])
        deadline = min(deadline, self._awaiting.deadline)
        with trio.CancelScope(deadline=deadline) as wait:
            self._wake = wait
            try:
                return await sock.receive()
            except ConnectionClosed as exc:
                self._closed(sock, exc)
                self._ending = True
                return None
            finally:
                self._wake = None
        return None

    def _check_deadlines(self) -> bool:
        """After a wait came back empty: a turn past its deadline, or an upstream silent past
        `read_timeout`, ends every turn (the socket's state is unknown)."""
        now = trio.current_time()
        for notice in self._awaiting.expired(now):  # answered by silence
            self._settle_notice(notice)
        late = [turn for turn in self.running_turns() if turn.deadline <= now]
        if late and all(self._isolated(turn) for turn in late):
            # On a shared socket a late response's lane is in an unknown state, the others'
            # are not: the late turns end alone (their lanes keep dropping whatever still
            # comes), and the socket takes no more turns; the ones running finish.
            for turn in late:
                if not turn.discarding:
                    timeout = errors.turn_timeout(self._settings.turn_timeout)
                    self._cut(turn, broken_end("timeout", timeout, turn.tracker))
                turn.deadline = math.inf
            self.retire()
            late = []
        if late:
            self._break_all("timeout", errors.turn_timeout(self._settings.turn_timeout))
            return False
        if self._lanes and self._silent_since(now):
            self._break_all("timeout", errors.upstream_silent(self._settings.read_timeout))
            return False
        return True

    def _silent_since(self, now: float) -> bool:
        # The wait's own deadline was `read_timeout` after it began; it began no earlier
        # than the last frame, so a wait that ended at or past that is silence.
        return now - self._last_frame >= self._settings.read_timeout

    def _drop_abandoned(self) -> bool:
        """A client left mid-turn: the upstream's state is unknown, so the socket closes
        and the other turns on it end with a clear error."""
        self._left = False
        gone = [
            turn
            for turn in self.running_turns()
            if turn.scope.cancel_called and not turn.discarding
        ]
        if not gone:
            return True
        if all(self._isolated(turn) for turn in gone):
            for turn in gone:
                self._cut(turn, TurnEnd("abandoned"))
            return True
        for turn in gone:
            self._remove(turn)
            self._end(turn, TurnEnd("abandoned"))
        self._break_all("socket", errors.upstream_closed("socket closed by the proxy"))
        return False

    def _spoke_while_idle(self, sock: ClientSocket) -> bool:
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
