"""The registry's lane half: seats for sessions on shared sockets, forks, rotation, TTL.

With the `lanes` setting on, a named session gets a seat (lanes.py) instead of a socket of its
own. Everything here is synchronous except opening a socket, and the registry calls it from
its own callbacks, so no request ever sees a half-updated state. At most one socket per group
is being opened at a time: a thousand sessions arriving together wait for it and fill its lanes
rather than opening a thousand sockets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

import trio

from trioproxy.config import Settings
from trioproxy.delta import Conversation
from trioproxy.errors import ApiError
from trioproxy.lanes import LANE_NAMES, Seat, SeatIndex, SharedSocket
from trioproxy.placement import IdleIndex
from trioproxy.turn import Turn, TurnEnd
from trioproxy.upstream import UpstreamConnection

# Whether a pooled socket (or seat) suits a request: given its memory and the ids of the
# responses its socket finished last.
Reusable = Callable[[Conversation | None, Collection[str]], bool]
Opener = Callable[[str, list[tuple[str, str]]], Awaitable[UpstreamConnection]]


@dataclass(eq=False)
class _Opening:
    """A group's socket being opened: others wait for it, and hear its failure."""

    done: trio.Event = field(default_factory=trio.Event)
    error: ApiError | None = None


class LanePool:
    def __init__(
        self,
        settings: Settings,
        opener: Opener,
        retire: Callable[[UpstreamConnection, str], None],
    ) -> None:
        self._settings = settings
        self._opener = opener
        self._retire = retire
        self.sessions = SeatIndex()
        # Idle seats of sessions that name themselves by no header, found by content.
        self.unnamed = IdleIndex()
        self._groups: dict[str, list[SharedSocket]] = {}
        self._of: dict[UpstreamConnection, SharedSocket] = {}
        self._opening: dict[str, _Opening] = {}
        # Names per socket a group's upstream was seen to accept, when fewer than ours.
        self._limits: dict[str, int] = {}
        self.forks = 0  # concurrent requests that ran on another lane of their session's socket
        self.moved: Counter[str] = Counter()  # seats given up, by why

    # -- what the registry reports ------------------------------------------------------------
    def shares(self, conn: UpstreamConnection) -> bool:
        return conn in self._of

    @property
    def sockets(self) -> int:
        """Shared sockets that take turns (one retired and still closing is not counted)."""
        return sum(1 for conn in self._of if conn.accepting)

    @property
    def idle_sockets(self) -> int:
        return sum(1 for conn in self._of if not conn.pending)

    # -- placement ---------------------------------------------------------------------------
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
    ) -> Seat | None:
        """The session's seat, a fork beside it while it is busy, or a new seat on a socket of
        its group with a free lane (opened if none has one). None: the session is busy and its
        socket has no free lane; the caller gives the request a socket of its own."""
        while True:
            now = trio.current_time()
            seat = self.sessions.get(key)
            if seat is not None:
                if seat.busy:
                    return self._fork(seat, now) if seat.conn is not avoid else None
                why = self._stale(seat, now, reusable, fresh, avoid)
                if why is None:
                    self.unnamed.remove(seat)
                    self.sessions.wake(seat)
                    seat.conn.busy = True
                    return seat
                self._unseat(seat, why)
            shared = self._room(group, now, avoid)
            if shared is not None:
                break
            opening = self._opening.get(group)
            if opening is None:
                shared = await self._open(group, url, headers)
                break
            # The socket being opened for this group may have room; the same session may have
            # been seated meanwhile (a second request of a new session): look again.
            await opening.done.wait()
            if opening.error is not None:
                raise opening.error  # every waiter hears the failure, none retries in turn
        lane = shared.free_lane()
        assert lane is not None
        seat = Seat(shared.conn, lane, key, last_used=now, group=group if unnamed else None)
        shared.take(seat)
        self.sessions.add(seat)
        shared.conn.busy = True
        return seat

    def _stale(
        self,
        seat: Seat,
        now: float,
        reusable: Reusable | None,
        fresh: bool,
        avoid: UpstreamConnection | None,
    ) -> str | None:
        """Why an idle seat cannot take the session's next turn, or None."""
        shared = self._of.get(seat.conn)
        if shared is None or not seat.conn.accepting:
            return "closed"
        if seat.last_used + self._settings.idle_ttl <= now:
            return "idle_ttl"
        if now >= shared.moves_at(seat) or now >= self._end_of_life(seat.conn):
            return "rotated"
        if fresh or seat.conn is avoid:
            return "replaced"
        if reusable is not None and not reusable(seat.memory, seat.conn.answered):
            return "replaced"
        return None

    def _fork(self, seat: Seat, now: float) -> Seat | None:
        """Another lane of a busy session's socket, remembering the session's last response:
        the request goes as a fork from it, with only its new items."""
        shared = self._of.get(seat.conn)
        if shared is None or not seat.conn.accepting or now >= self._end_of_life(seat.conn):
            return None
        lane = shared.free_lane()
        if lane is None:
            return None
        fork = Seat(seat.conn, lane, None, memory=seat.memory, last_used=now)
        shared.take(fork)
        self.forks += 1
        return fork

    def has_room(self, group: str, now: float) -> bool:
        """Whether a socket of the group takes a new seat now."""
        return self._room(group, now, None) is not None

    def _room(
        self, group: str, now: float, avoid: UpstreamConnection | None
    ) -> SharedSocket | None:
        """The group's fullest socket that still takes sessions (fewer sockets stay busy)."""
        best = None
        for shared in self._groups.get(group, ()):
            if shared.conn is avoid or not shared.open_for(now):
                continue
            if best is None or len(shared.seats) > len(best.seats):
                best = shared
        return best

    async def _open(self, group: str, url: str, headers: list[tuple[str, str]]) -> SharedSocket:
        opening = self._opening[group] = _Opening()
        try:
            conn = await self._opener(url, headers)
        except ApiError as exc:
            opening.error = exc
            raise
        finally:
            del self._opening[group]
            opening.done.set()
        usable = self._settings.usable_lifetime
        window = self._settings.rotation_window
        shared = SharedSocket(
            conn,
            group,
            names=LANE_NAMES[: self._limits.get(group, self._settings.lanes_per_socket)],
            rotate_at=conn.born + usable - window,
            window=window,
        )
        self._of[conn] = shared
        self._groups.setdefault(group, []).append(shared)
        return shared

    def _end_of_life(self, conn: UpstreamConnection) -> float:
        return conn.born + self._settings.usable_lifetime

    # -- callbacks (from the registry's) -----------------------------------------------------
    def turn_ended(self, conn: UpstreamConnection, turn: Turn, end: TurnEnd) -> None:
        """A lane's turn is over: the session's seat rests with its new memory, or goes (any
        other end: the session's next turn starts afresh, on whichever socket has room)."""
        shared = self._of.get(conn)
        seat = turn.seat
        if shared is None or seat is None or seat.lane is None:
            return
        if shared.seats.get(seat.lane) is not seat:
            return  # already given up (its socket retired, the session moved)
        if seat.key is None:
            del shared.seats[seat.lane]  # a fork: its response id stays in `answered`
        elif end.kind == "completed" and conn.accepting:
            seat.memory = end.remembered
            seat.fresh = False
            self._rest(seat, trio.current_time())
        else:
            self._unseat(seat, f"turn_{end.kind}")
        conn.busy = bool(conn.pending)

    def settled(self, conn: UpstreamConnection) -> None:
        conn.busy = bool(conn.pending)

    def give_back(self, seat: Seat) -> None:
        """A seat whose turn was never submitted: as it was."""
        shared = self._of.get(seat.conn)
        if seat.key is None:
            if shared is not None and shared.seats.get(seat.lane or "") is seat:
                del shared.seats[seat.lane or ""]
        elif self.sessions.get(seat.key) is seat:
            self._rest(seat, trio.current_time())
        seat.conn.busy = bool(seat.conn.pending)

    def refused(self, seat: Seat, code: str | None) -> None:
        """The upstream refused a turn on this seat's socket for a reason that concerns the
        socket: `websocket_stream_limit_reached` (it takes no more names), or
        `websocket_connection_limit_reached` (its life is over)."""
        shared = self._of.get(seat.conn)
        if shared is None:
            return
        if code == "websocket_stream_limit_reached":
            shared.used.discard(seat.lane or "")
            shared.cap()
            self._limits[shared.group] = max(1, len(shared.names))  # its next sockets too
        elif code == "websocket_connection_limit_reached":
            self.drop(seat.conn, "connection_limit")

    def exited(self, conn: UpstreamConnection) -> None:
        """The socket's task ended: every session seated on it starts afresh next turn."""
        shared = self._of.pop(conn, None)
        if shared is None:
            return
        for seat in list(shared.seats.values()):
            self._unseat(seat, "socket_closed")
        group = self._groups.get(shared.group, [])
        if shared in group:
            group.remove(shared)
        if not group:
            self._groups.pop(shared.group, None)

    def least_used(self) -> UpstreamConnection | None:
        """The shared socket with nothing running that was used longest ago."""
        idle = [c for c in self._of if not c.pending and c.accepting]
        return min(idle, key=lambda c: c.last_used) if idle else None

    def drop(self, conn: UpstreamConnection, reason: str) -> None:
        """Take no more turns on a shared socket: its sessions move on their next turn, the
        lanes running now finish first."""
        shared = self._of.get(conn)
        if shared is None:
            return
        for seat in list(shared.seats.values()):
            if not seat.busy:
                self._unseat(seat, reason)
        self._retire(conn, reason)

    def _rest(self, seat: Seat, now: float) -> None:
        self.sessions.rest(seat, now)
        if seat.group is not None:
            self.unnamed.add(seat)

    def _unseat(self, seat: Seat, reason: str) -> None:
        self.unnamed.remove(seat)
        shared = self._of.get(seat.conn)
        if shared is not None and shared.seats.get(seat.lane or "") is seat:
            del shared.seats[seat.lane or ""]
        self.sessions.remove(seat)
        self.moved[reason] += 1

    # -- the registry task's sweep -----------------------------------------------------------
    def sweep(self, now: float) -> float:
        """Give up idle seats past their TTL, close shared sockets past their life or empty
        past theirs; return when the next deadline falls."""
        ttl = self._settings.idle_ttl
        while (oldest := self.sessions.oldest_idle()) is not None:
            if oldest.last_used + ttl > now:
                break
            self._unseat(oldest, "idle_ttl")
        oldest = self.sessions.oldest_idle()
        deadline = oldest.last_used + ttl if oldest is not None else math.inf
        for shared in list(self._of.values()):
            conn = shared.conn
            if conn.pending or not conn.accepting:
                continue  # looked at again when its turns end; a retired one is closing
            if now >= self._end_of_life(conn):
                self.drop(conn, "max_lifetime")
            elif not shared.seats and conn.last_used + ttl <= now:
                self.drop(conn, "idle_ttl")
            else:
                deadline = min(deadline, self._end_of_life(conn))
                if not shared.seats:
                    deadline = min(deadline, conn.last_used + ttl)
        return deadline

    def shutdown(self) -> None:
        """Closing: every shared socket with nothing running goes now."""
        for conn in list(self._of):
            if not conn.pending:
                self.drop(conn, "shutdown")
