"""Sessions on named lanes of shared upstream sockets (the `lanes` setting).

The Responses WebSocket protocol multiplexes a connection into lanes (`stream_id`): each lane
runs its requests first in, first out, up to 16 responses run at once, and a connection accepts
32 distinct lane names over its life (openai `lib/responses_websocket/README.md`). With lanes on,
a session is a *seat*: one of the proxy's own lane names on a socket shared by every session of
the same credential, scope and upstream. Its turns go on its lane as suffixes of its last
response, exactly as on a socket of its own; a second request while the first runs takes
another free lane of the same socket and forks from the session's last response (the
connection's cache is shared by its lanes), instead of a new socket with the full input.

This module holds the bookkeeping: which seats a socket has, which of its 32 names are free,
when it stops taking sessions and when each of them moves off (rotation). The registry still
decides placement, TTL and eviction through it, and each socket is still driven by the one task
that owns it (upstream.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from trioproxy.delta import Conversation
from trioproxy.upstream import UpstreamConnection

# The proxy's own lane names, reused as seats come and go: the protocol counts distinct names
# per connection, so a socket never uses more than these.
LANE_NAMES = tuple(f"tp{i}" for i in range(32))


@dataclass(eq=False, slots=True)
class Seat:
    """Where a turn goes: a socket, the lane on it (None: the default lane) and what that lane
    remembers of the session. `key` None: not a session's own (a fork's lane, a one-turn
    socket), given up when the turn ends."""

    conn: UpstreamConnection
    lane: str | None
    key: str | None = None
    memory: Conversation | None = None
    busy: bool = True
    last_used: float = 0.0
    fresh: bool = True  # no turn has run on it yet
    # The credential group of a session that names itself by no header (placement.py finds
    # its seat by the conversation it continues); None for a named session.
    group: str | None = None

    @property
    def fork(self) -> bool:
        return self.key is None and self.lane is not None


@dataclass(eq=False)
class SharedSocket:
    """A socket that seats sessions of one group on its named lanes."""

    conn: UpstreamConnection
    group: str
    # Seats by lane name, the sessions' and the forks' running now.
    seats: dict[str, Seat] = field(default_factory=dict)
    # The names it may use: the proxy's first `lanes_per_socket`, cut to those already used
    # when the upstream refuses one more (`websocket_stream_limit_reached`).
    names: tuple[str, ...] = LANE_NAMES
    # From then on it takes no new seat, and its seats move off one by one.
    rotate_at: float = math.inf
    window: float = 0.0
    used: set[str] = field(default_factory=set)  # names sent upstream so far

    def free_lane(self) -> str | None:
        """A name no seat holds and no response still runs on (an abandoned turn's response
        runs out on its lane before the name is given again)."""
        busy = self.conn.busy_lanes()
        for name in self.names:
            if name not in self.seats and name not in busy:
                return name
        return None

    def cap(self) -> None:
        """The upstream took no more names: keep to the ones it took."""
        self.names = tuple(name for name in self.names if name in self.used)

    def take(self, seat: Seat) -> None:
        assert seat.lane is not None
        self.seats[seat.lane] = seat
        self.used.add(seat.lane)

    def open_for(self, now: float) -> bool:
        """Whether it takes a new session now."""
        return self.conn.accepting and now < self.rotate_at and self.free_lane() is not None

    def moves_at(self, seat: Seat) -> float:
        """When a session seated here moves to a newer socket: spread over the rotation
        window by lane, so a full socket's sessions do not all resend their input at once."""
        index = LANE_NAMES.index(seat.lane) if seat.lane in LANE_NAMES else 0
        return self.rotate_at + self.window * index / len(LANE_NAMES)


class SeatIndex:
    """Sessions' seats by pool key, idle ones in least-recently-used order (the first is the
    next to pass its idle TTL)."""

    def __init__(self) -> None:
        self.seats: dict[str, Seat] = {}
        self.idle: OrderedDict[str, Seat] = OrderedDict()

    def __len__(self) -> int:
        return len(self.seats)

    def get(self, key: str) -> Seat | None:
        return self.seats.get(key)

    def add(self, seat: Seat) -> None:
        assert seat.key is not None
        self.seats[seat.key] = seat

    def rest(self, seat: Seat, now: float) -> None:
        """A seat's turn ended well: idle, most recently used."""
        assert seat.key is not None
        seat.busy = False
        seat.last_used = now
        self.idle[seat.key] = seat
        self.idle.move_to_end(seat.key)

    def wake(self, seat: Seat) -> None:
        assert seat.key is not None
        self.idle.pop(seat.key, None)
        seat.busy = True

    def remove(self, seat: Seat) -> None:
        if seat.key is None:
            return
        if self.seats.get(seat.key) is seat:
            del self.seats[seat.key]
        if self.idle.get(seat.key) is seat:
            del self.idle[seat.key]

    def oldest_idle(self) -> Seat | None:
        return next(iter(self.idle.values()), None)
