"""Where a request that names no session goes: an index of the pool's idle header-less sockets.

The `openai` SDK sends no session header. Such a request is placed by what it carries, among
the idle sockets of its credential group: the socket whose last response it chains from, else
the one whose remembered conversation its input extends (found through the conversations' last
item digests, keyed with the group and the item count: one lookup per item of the request, never
a scan of the pool), else a warm idle socket of the group (least recently used first), else a
new one. The registry owns this index and keeps it to its idle sockets: a socket leaves it when
it is leased or goes. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Literal, Protocol

from trioproxy.delta import Conversation
from trioproxy.items import DIGEST_SIZE


class Indexed(Protocol):
    """What the index holds: an idle socket of a header-less session, or (lanes) its seat."""

    @property
    def key(self) -> str | None: ...
    @property
    def group(self) -> str | None: ...
    @property
    def memory(self) -> Conversation | None: ...


# How a turn found its socket: a session header's or cache key's own socket, a header-less
# conversation recognised by its content or chained id, a warm idle socket, a new one.
Placement = Literal["header", "cache_key", "inferred", "warm", "new", "lane", "fork"]
# New keys for header-less conversations, one count for every index in the process (the pool's
# and the lanes'): a key names one conversation wherever it is placed.
_PLACED = itertools.count(1)
# How many new items a header-less continuation may add and still be recognised.
_NEW_ITEMS_SEARCHED = 4096
_SAME_ENDINGS_TRIED = 8


class IdleIndex:
    """The idle header-less sockets, by credential group, by conversation ending, by last
    response id."""

    def __init__(self) -> None:
        self._warm: dict[str, OrderedDict[Indexed, None]] = {}
        # (group, item count, last item digest) -> idle sockets whose conversation ends so:
        # keyed by all three, a lookup never meets another group's or another length's.
        self._tails: dict[tuple[str, int, bytes], dict[Indexed, None]] = {}
        self._answers: dict[str, Indexed] = {}

    def __len__(self) -> int:
        """Entries of every kind: 0 when no idle header-less socket is indexed."""
        return len(self._answers) + len(self._tails) + len(self._warm)

    def place(
        self, group: str, history: bytes, params: bytes, chained: str | None, *, warm: bool = True
    ) -> tuple[str, Placement]:
        """The pool key for a request of credential `group` that names no session, and how
        it was found. `history` is its input's item digests, `params` its parameters' digest,
        `chained` the `previous_response_id` it sent. Synchronous: the caller leases the key
        before anything else runs."""
        if chained is not None:
            conn = self._answers.get(chained)
            if conn is not None and conn.group == group:
                assert conn.key is not None
                return conn.key, "inferred"
        else:
            found = self._continued(group, history, params)
            if found is not None:
                return found, "inferred"
        idle = self._warm.get(group) if warm else None
        if idle:
            conn = next(iter(idle))
            assert conn.key is not None
            return conn.key, "warm"
        return f"{group}/{next(_PLACED)}", "new"

    def _continued(self, group: str, history: bytes, params: bytes) -> str | None:
        """The idle socket whose conversation `history` extends, longest first: a lookup per
        item of the request (at most `_NEW_ITEMS_SEARCHED`: a continuation adds a few items,
        and a huge input must not hold the event loop), independent of the pool's size."""
        items = len(history) // DIGEST_SIZE
        for count in range(items - 1, max(0, items - 1 - _NEW_ITEMS_SEARCHED), -1):
            tail = history[(count - 1) * DIGEST_SIZE : count * DIGEST_SIZE]
            entries = self._tails.get((group, count, tail), {})
            # Most recently idle first, a few at most: sockets that end the same way at the
            # same length hold the same conversation, one is as good as another.
            for conn in itertools.islice(reversed(entries), _SAME_ENDINGS_TRIED):
                memory = conn.memory
                if (
                    memory is not None
                    and memory.params == params
                    and memory.extended_by(history) is not None
                ):
                    return conn.key
        return None

    def add(self, conn: Indexed) -> None:
        """An idle header-less socket becomes findable by `place`."""
        assert conn.group is not None
        self._warm.setdefault(conn.group, OrderedDict())[conn] = None
        memory = conn.memory
        if memory is not None:
            self._answers[memory.response_id] = conn
            for tail in memory.tails():
                self._tails.setdefault((conn.group, memory.item_count, tail), {})[conn] = None

    def remove(self, conn: Indexed) -> None:
        """Taken for a turn, or gone: no longer findable (idempotent)."""
        if conn.group is None:
            return
        warm = self._warm.get(conn.group)
        if warm is not None:
            warm.pop(conn, None)
            if not warm:
                del self._warm[conn.group]
        memory = conn.memory
        if memory is None:
            return
        if self._answers.get(memory.response_id) is conn:
            del self._answers[memory.response_id]
        for tail in memory.tails():
            key = (conn.group, memory.item_count, tail)
            entries = self._tails.get(key)
            if entries is not None:
                entries.pop(conn, None)
                if not entries:
                    del self._tails[key]
