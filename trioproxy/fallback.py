"""When to send turns over HTTP instead of a WebSocket. Pure: the caller passes the time.

Two reasons, each for a cool-down, after which WebSocket is tried again:

- the upstream refused the upgrade itself (400, 404 or 426 on the handshake): every turn of
  that credential group (upstream, credential, scope, meaningful headers: see `keys.pool_key`)
  goes over HTTP, the first one at once, transparently. Keyed by group, not by URL, so one
  client's refusal (its own bad header, a key without WebSocket access) never changes another
  tenant's transport;
- one session's sockets failed `after` times in a row (dropped, silent, unreachable): that
  session's turns go over HTTP, whose one request per turn has no socket to lose.

HTTP turns always send the full input: a `previous_response_id` made on a socket does not
resolve elsewhere with `store: false`.
"""

from __future__ import annotations

from collections import OrderedDict

REFUSALS = frozenset({400, 404, 426})  # handshake statuses that mean "no WebSocket here"


class FallbackPolicy:
    def __init__(self, after: int, cooldown: float, *, enabled: bool = True, size: int = 100_000):
        self.after = after
        self.cooldown = cooldown
        self.enabled = enabled
        self._refused: OrderedDict[str, float] = OrderedDict()  # credential group -> until when
        self._failures: OrderedDict[str, int] = OrderedDict()  # pool key -> failures in a row
        self._sessions: OrderedDict[str, float] = OrderedDict()  # pool key -> until when
        self._size = size

    def use_http(self, group: str, key: str | None, now: float) -> bool:
        if not self.enabled:
            return False
        if self._refused.get(group, -1.0) > now:
            return True
        return key is not None and self._sessions.get(key, -1.0) > now

    def websocket_refused(self, group: str, now: float) -> None:
        self._refused[group] = now + self.cooldown
        self._refused.move_to_end(group)
        self._trim(self._refused)

    def socket_failed(self, key: str | None, now: float) -> None:
        if key is None:
            return
        count = self._failures.pop(key, 0) + 1
        if count >= self.after:
            self._sessions[key] = now + self.cooldown
            self._sessions.move_to_end(key)
            self._trim(self._sessions)
        else:
            self._failures[key] = count
            self._trim(self._failures)

    def socket_ok(self, key: str | None) -> None:
        if key is not None:
            self._failures.pop(key, None)
            self._sessions.pop(key, None)

    def _trim(self, table: OrderedDict[str, int] | OrderedDict[str, float]) -> None:
        while len(table) > self._size:
            table.popitem(last=False)
