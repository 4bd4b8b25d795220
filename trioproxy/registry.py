"""The pool of upstream sockets: which socket serves a session, and when a socket goes.

One registry task owns the nursery every socket task runs in, and enforces idle TTL and maximum
lifetime by sleeping until the next deadline. Deadlines are found without scanning: idle sockets
sit in least-recently-used order (the first is the next to pass its idle TTL, and the first to
go when the cap is reached) and pooled sockets in creation order (the first is the next to pass
its usable lifetime). Nothing here blocks; only opening a socket awaits, in the asking task.

A request that names no session (no session header, no `prompt_cache_key`: the `openai` SDK's
default) is placed by what it carries among the idle sockets of its credential group, through
an index of them the registry keeps current (placement.py).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from trioproxy import errors, httpturn
from trioproxy.config import Settings
from trioproxy.connector import Connector
from trioproxy.httpturn import HttpExchange
from trioproxy.lanepool import LanePool, Reusable
from trioproxy.lanes import Seat
from trioproxy.placement import IdleIndex, Placement
from trioproxy.telemetry import Carrier, Telemetry
from trioproxy.turn import Turn, TurnEnd
from trioproxy.upstream import UpstreamConnection

log = logging.getLogger("trioproxy.registry")


class Registry:
    def __init__(
        self, settings: Settings, connector: Connector, telemetry: Telemetry | None = None
    ) -> None:
        self._settings = settings
        self._connector = connector
        self._telemetry = telemetry or Telemetry()
        # Told of every finished turn, after the pool's own bookkeeping (synchronously).
        self.on_turn: list[Callable[[Carrier, Turn, TurnEnd], None]] = [self._telemetry.turn_ended]
        self._pooled: dict[str, UpstreamConnection] = {}
        self._idle: OrderedDict[str, UpstreamConnection] = OrderedDict()
        self._by_age: dict[UpstreamConnection, None] = {}  # pooled, oldest first
        self._live: set[UpstreamConnection] = set()  # every socket task, pooled or one-turn
        self._evicted: set[UpstreamConnection] = set()  # shared ones whose eviction counted
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._stopped = trio.Event()
        self._closing = False
        self.draining = False  # shutting down: no new turns, the running ones may finish
        self._changed = trio.Event()  # a turn ended or a socket went: for `wait_quiet`
        self.evictions: Counter[str] = Counter()
        self.opened = 0
        # Idle sockets of header-less requests, for `place` (placement.py).
        self.unnamed = IdleIndex()
        # Sessions on lanes of shared sockets (the `lanes` setting; lanepool.py).
        self.lanes = LanePool(settings, self._open_shared, self._retire)

    # -- what tests, metrics and the health check read --------------------------------------
    @property
    def pooled(self) -> int:
        """Sockets kept for sessions: their own, and shared ones (lanes)."""
        return len(self._pooled) + self.lanes.sockets

    @property
    def idle(self) -> int:
        return len(self._idle) + self.lanes.idle_sockets

    @property
    def live(self) -> int:
        """Open upstream sockets, one-turn ones included."""
        return len(self._live)

    @property
    def tasks(self) -> int:
        """Socket tasks still running: must match `live`, or a task leaked."""
        return len(self._nursery.child_tasks) if self._nursery is not None else 0

    def stats(self) -> dict[str, Any]:
        return {
            "pooled": self.pooled,
            "idle": self.idle,
            "live": self.live,
            "opened": self.opened,
            "seats": len(self.lanes.sessions),
            "forks": self.lanes.forks,
            "seats_moved": dict(self.lanes.moved),
            "evictions": dict(self.evictions),
            "buffered_events": self.buffered_events,
            "buffered_bytes": self.buffered_bytes,
        }

    @property
    def buffered_bytes(self) -> int:
        """Bytes of those events (each turn's is bounded by `event_buffer_bytes`)."""
        return sum(t.buffered_bytes for conn in self._live for t in conn.running_turns())

    @property
    def buffered_events(self) -> int:
        """Events waiting for slow clients, over all turns in progress (each turn's is bounded)."""
        return sum(t.buffered for conn in self._live for t in conn.running_turns())

    # -- the registry task -------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every socket task; close sockets as their deadlines pass. Runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._sweep_forever()
        finally:
            self._nursery = None
            self._stopped.set()

    async def _sweep_forever(self) -> None:
        while True:
            deadline = self._sweep(trio.current_time())
            self._wake = trio.Event()
            with trio.move_on_at(deadline):
                await self._wake.wait()

    def _idle_deadline(self, conn: UpstreamConnection) -> float:
        return conn.last_used + self._settings.idle_ttl

    def _age_deadline(self, conn: UpstreamConnection) -> float:
        """After this a socket may not start a turn: it could not finish it in its lifetime."""
        return conn.born + self._settings.usable_lifetime

    def _sweep(self, now: float) -> float:
        """Close every idle socket past a deadline; return when the next deadline falls."""
        while self._idle:
            conn = next(iter(self._idle.values()))
            if self._idle_deadline(conn) > now:
                break
            self._retire(conn, "idle_ttl")
        next_deadline = (
            self._idle_deadline(next(iter(self._idle.values()))) if self._idle else math.inf
        )
        expired = []
        for conn in self._by_age:  # oldest first: stops at the first one still usable
            if self._age_deadline(conn) > now:
                next_deadline = min(next_deadline, self._age_deadline(conn))
                break
            if not conn.busy:  # a busy one is retired when its turn ends
                expired.append(conn)
        for conn in expired:
            self._retire(conn, "max_lifetime")
        return min(next_deadline, self.lanes.sweep(now))

    def place(
        self, group: str, history: bytes, params: bytes, chained: str | None, *, lanes: bool = False
    ) -> tuple[str, Placement]:
        """The pool key for a request that names no session (see placement.py); leased by the
        caller before anything else runs. With `lanes`, among idle seats: a request that
        continues none takes a new seat while a socket of its group has a free lane, else the
        least recently used idle seat of its group (as without lanes an idle socket), so
        sockets grow with requests at once, not with requests made."""
        if lanes:
            warm = not self.lanes.has_room(group, trio.current_time())
            return self.lanes.unnamed.place(group, history, params, chained, warm=warm)
        return self.unnamed.place(group, history, params, chained)

    # -- leasing -----------------------------------------------------------------------------
    async def lease(
        self,
        key: str | None,
        url: str,
        headers: list[tuple[str, str]],
        *,
        reusable: Reusable | None = None,
        fresh: bool = False,
        group: str | None = None,
    ) -> UpstreamConnection:
        """A socket for one turn, marked busy: the session's idle one, or a new one.

        A busy session never makes a request wait: that request gets a one-turn socket of its
        own. `reusable` may refuse the pooled socket (its memory does not fit this request) and
        `fresh` always does; the refused socket is replaced. `group` marks a socket opened for
        requests that name no session (see `place`).
        """
        if key is None:
            return await self._open(None, url, headers)
        now = trio.current_time()
        conn = self._pooled.get(key)
        if conn is not None:
            if conn.busy:
                return await self._open(None, url, headers)
            if self._idle_deadline(conn) <= now:
                self._retire(conn, "idle_ttl")
            elif self._age_deadline(conn) <= now:
                self._retire(conn, "max_lifetime")
            elif fresh or (reusable is not None and not reusable(conn.memory, conn.answered)):
                self._retire(conn, "replaced")
            else:
                del self._idle[key]
                self.unnamed.remove(conn)
                conn.busy = True
                return conn
        if self.pooled >= self._settings.max_sockets and not self._make_room():
            return await self._open(None, url, headers)  # all busy: never an error
        return await self._open(key, url, headers, group)

    def _make_room(self) -> bool:
        """At `max_sockets`: close the least recently used idle socket, a session's own or
        a shared one (its sessions start afresh next turn); False when every one is busy."""
        if self._idle:
            self._retire(next(iter(self._idle.values())), "lru")
            return True
        victim = self.lanes.least_used()
        if victim is None:
            return False
        self.lanes.drop(victim, "lru")
        return True

    async def seat(
        self,
        key: str,
        group: str,
        url: str,
        headers: list[tuple[str, str]],
        *,
        reusable: Reusable | None = None,
        fresh: bool = False,
        avoid: UpstreamConnection | None = None,
        unnamed: bool = False,
    ) -> Seat:
        """A session's place with lanes on (lanepool.py): its seat on a shared socket, a fork
        beside it while it is busy, or (busy, and no lane free) a one-turn socket. `unnamed`:
        a session that names itself by no header (its idle seat is found by content)."""
        if self._nursery is None or self._closing or self.draining:
            raise errors.shutting_down()
        seat = await self.lanes.seat(
            key, group, url, headers, reusable=reusable, fresh=fresh, avoid=avoid, unnamed=unnamed
        )
        self._wake.set()
        if seat is None:
            return Seat(await self._open(None, url, headers), None)
        return seat

    async def _open_shared(self, url: str, headers: list[tuple[str, str]]) -> UpstreamConnection:
        """A new shared socket; at `max_sockets` the least recently used idle socket goes
        first (its sessions start afresh on their next turn). All busy: opened anyway."""
        if self.pooled >= self._settings.max_sockets:
            self._make_room()
        return await self._open("lanes", url, headers, shared=True)

    async def _open(
        self,
        key: str | None,
        url: str,
        headers: list[tuple[str, str]],
        group: str | None = None,
        *,
        shared: bool = False,
    ) -> UpstreamConnection:
        if self._nursery is None or self._closing or self.draining:
            raise errors.shutting_down()
        conn = UpstreamConnection(
            key=key,
            url=url,
            headers=headers,
            settings=self._settings,
            on_turn_end=self._turn_ended,
            on_exit=self._exited,
            on_settled=self._nothing_pending,
            shared=shared,
        )
        conn.group = group if key is not None else None
        if key is not None and not shared:
            self._pooled[key] = conn
            self._by_age[conn] = None
        self._live.add(conn)
        started = trio.current_time()
        try:
            await self._nursery.start(conn.run, self._connector)
        except BaseException:
            self._exited(conn)  # idempotent: the task's own exit usually did it already
            raise
        self._telemetry.handshake.observe(trio.current_time() - started)
        self.opened += 1
        self._wake.set()
        return conn

    # -- HTTP turns (the fallback transport) ---------------------------------------------------
    async def run_http(
        self, turn: Turn, url: str, headers: list[tuple[str, str]], key: str | None
    ) -> None:
        """Start a turn over HTTP in a task of this nursery, like a socket's, so shutdown
        reaches it; it finishes the turn whatever happens."""
        if self._nursery is None or self._closing or self.draining:
            raise errors.shutting_down()
        await self._nursery.start(self._http_turn, turn, url, headers, HttpExchange.new(key))

    async def _http_turn(
        self,
        turn: Turn,
        url: str,
        headers: list[tuple[str, str]],
        exchange: HttpExchange,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            end = await httpturn.run(turn, url, headers, self._settings, task_status=task_status)
            for observer in self.on_turn:
                observer(exchange, turn, end)
        finally:
            self._notify()

    # -- callbacks from socket tasks (synchronous, so no request can see a stale state) --------
    def _turn_ended(self, conn: UpstreamConnection, turn: Turn, end: TurnEnd) -> None:
        """A turn is over: "completed" keeps a pooled socket, every other end evicts it."""
        for observer in self.on_turn:
            observer(conn, turn, end)
        self._notify()
        ended = end.kind
        conn.last_used = trio.current_time()
        if conn.shared:
            if ended != "completed" and not conn.accepting and conn not in self._evicted:
                self._evicted.add(conn)  # the socket goes: once, whatever lanes it ends
                self.evictions[ended] += 1
            self.lanes.turn_ended(conn, turn, end)
            self._shared_settled(conn)
            return
        # A named lane's refused or failed response leaves the socket accepting (upstream.py).
        if conn.one_turn or (ended != "completed" and not conn.accepting):
            if not conn.one_turn and conn in self._by_age:  # once per socket, not per lane
                self.evictions[ended] += 1
            self._forget(conn)
            return
        if conn.pending:  # other lanes still run on it (a WebSocket client's), or it is held
            return
        self._settled(conn)

    def _settled(self, conn: UpstreamConnection) -> None:
        """Nothing pending on a socket: idle in the pool again, if it still belongs there."""
        if self._pooled.get(conn.key or "") is not conn or not conn.accepting:
            # Forgotten while a lane still ran (evicted, replaced, shutdown): it goes.
            self._forget(conn)
            conn.retire()
            return
        conn.busy = False
        if self._closing:
            self._retire(conn, "shutdown")
            return
        if self._age_deadline(conn) <= conn.last_used:
            self._retire(conn, "max_lifetime")
            return
        assert conn.key is not None
        self._idle[conn.key] = conn
        self._idle.move_to_end(conn.key)
        if conn.group is not None:
            self.unnamed.add(conn)
        self._wake.set()

    def _shared_settled(self, conn: UpstreamConnection) -> None:
        """A shared socket's turn ended: closing, it goes once nothing runs on it."""
        if self._closing and not conn.pending:
            self.lanes.drop(conn, "shutdown")
        self._wake.set()

    def release(self, conn: UpstreamConnection, owner: object) -> None:
        """A socket held with no turn (`Proxy.hold_socket`) is let go: idle again once
        nothing else runs on it (`_nothing_pending`)."""
        conn.unhold(owner)

    def _nothing_pending(self, conn: UpstreamConnection) -> None:
        """The last job on a socket ended without a turn's end to say so (a relayed event
        answered, a hold released): idle again, or closed if no session can reuse it."""
        if conn.shared:
            self.lanes.settled(conn)
            self._shared_settled(conn)
            self._notify()
            return
        if not conn.busy or conn.pending:
            return
        if conn.one_turn:
            self._retire(conn, "unused")
            return
        self._settled(conn)
        self._notify()

    def give_back(self, conn: UpstreamConnection) -> None:
        """A leased socket whose turn was never submitted: idle again as it was (a one-turn
        socket, which no session can reuse, is closed)."""
        if conn.one_turn or self._pooled.get(conn.key or "") is not conn:
            self._retire(conn, "unused")
            return
        conn.busy = False
        assert conn.key is not None
        self._idle[conn.key] = conn
        self._idle.move_to_end(conn.key)
        if conn.group is not None:
            self.unnamed.add(conn)
        self._wake.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def close_timeout(self) -> float:
        return self._settings.close_timeout

    @property
    def busy(self) -> int:
        """Sockets in a turn (or opening for one)."""
        return self.live - self.idle

    async def wait_quiet(self) -> None:
        """Until no socket is in a turn: what a graceful shutdown waits for."""
        while self.busy:
            await self._changed.wait()

    def _exited(self, conn: UpstreamConnection) -> None:
        if self._pooled.get(conn.key or "") is conn and not conn.busy:
            self.evictions["closed_idle"] += 1  # the upstream went away while it sat idle
        self._forget(conn)
        self.lanes.exited(conn)
        self._evicted.discard(conn)
        self._live.discard(conn)
        self._notify()

    # -- eviction ----------------------------------------------------------------------------
    def _forget(self, conn: UpstreamConnection) -> None:
        self.unnamed.remove(conn)
        if conn.key is not None and self._pooled.get(conn.key) is conn:
            del self._pooled[conn.key]
        if conn.key is not None and self._idle.get(conn.key) is conn:
            del self._idle[conn.key]
        self._by_age.pop(conn, None)

    def _retire(self, conn: UpstreamConnection, reason: str) -> None:
        log.debug("retiring %r: %s", conn, reason)
        self.evictions[reason] += 1
        self._forget(conn)
        conn.retire()

    def kill_busy(self) -> int:
        """End every running turn now (its client gets a clear error); how many there were."""
        busy = [conn for conn in self._live if conn.busy]
        for conn in busy:
            conn.kill()
        return len(busy)

    async def aclose(self, grace: float | None = None) -> None:
        """Close every socket: idle ones gracefully, then whatever is left after the grace
        (`shutdown_grace` unless given). Idempotent."""
        self._closing = True
        for conn in list(self._pooled.values()):
            if not conn.busy:
                self._retire(conn, "shutdown")
        self.lanes.shutdown()
        with trio.move_on_after(self._settings.shutdown_grace if grace is None else grace):
            for conn in list(self._live):
                await conn.closed.wait()
        for conn in list(self._live):
            conn.kill()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        await self._stopped.wait()
