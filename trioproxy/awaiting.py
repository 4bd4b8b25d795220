"""Notices a socket sent whose answers may still come: relayed events, steers on a shared socket.

The upstream takes messages in order and refuses one it does not take with an `error` on the
default lane. So while notices await, an `error` without a lane answers the oldest; a steering
answer (`response.steer.*`) settles the steer that named its response; and silence past
`ANSWER_WAIT` counts as the message taken without an answer. Pure bookkeeping: the socket's
task (upstream.py) passes the time and settles what it is handed back.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import orjson

from trioproxy.events import UpstreamEvent
from trioproxy.jobs import Notice

# How long a notice may take to be answered (an `error`, on the default lane) before its
# silence is taken as acceptance; a relaying client's default lane waits meanwhile.
ANSWER_WAIT = 5.0


class Awaiting:
    """The notices awaiting an answer, oldest first, each with the time its wait ends."""

    def __init__(self) -> None:
        self._queue: deque[tuple[Notice, float]] = deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def add(self, notice: Notice, now: float) -> None:
        self._queue.append((notice, now + ANSWER_WAIT))

    @property
    def steering(self) -> bool:
        """Whether a steer awaits its answer (on a shared socket one at a time)."""
        return any(notice.target is not None for notice, _ in self._queue)

    @property
    def deadline(self) -> float:
        """When the oldest one's wait ends (infinity with none)."""
        return self._queue[0][1] if self._queue else math.inf

    def expired(self, now: float) -> list[Notice]:
        """Those answered by silence by `now`, taken out."""
        done = []
        while self._queue and self._queue[0][1] <= now:
            done.append(self._queue.popleft()[0])
        return done

    def oldest(self) -> Notice:
        """The one a lane-less `error` answers, taken out."""
        return self._queue.popleft()[0]

    def steered(self, event: UpstreamEvent) -> Notice | None:
        """The steer a steering answer settles (the one naming its response), taken out."""
        target = steer_target(event)
        for entry in self._queue:
            if target is not None and entry[0].target == target:
                self._queue.remove(entry)
                return entry[0]
        return None

    def remove(self, notice: Notice) -> bool:
        """Take `notice` out; whether it was there."""
        for entry in self._queue:
            if entry[0] is notice:
                self._queue.remove(entry)
                return True
        return False

    def drain(self) -> list[Notice]:
        """All of them, taken out (no answer will come)."""
        notices = [notice for notice, _ in self._queue]
        self._queue.clear()
        return notices


def steer_target(event: UpstreamEvent) -> str | None:
    """The response a steering answer names."""
    steer = event.data.get("steer")
    target = steer.get("previous_response_id") if isinstance(steer, dict) else None
    return target if isinstance(target, str) else None


def steer_failure(message: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """`response.steer.failed` for a steer `message` that did not take: the input comes back
    so the client can carry it into its next `response.create`."""
    return {
        "type": "response.steer.failed",
        "sequence_number": 0,
        "error": error,
        "steer": {
            "input": message.get("input"),
            "previous_response_id": message.get("previous_response_id"),
        },
    }


def steer_refused(notice: Notice, error: UpstreamEvent) -> UpstreamEvent:
    """The `response.steer.failed` an upstream's lane-less `error` for a steer amounts to:
    the upstream's error, the input returned, the response named (so it finds its turn)."""
    cause = error.data.get("error")
    event = steer_failure(
        {**orjson.loads(notice.payload), "previous_response_id": notice.target},
        cause if isinstance(cause, dict) else {"message": "steering refused"},
    )
    return UpstreamEvent("response.steer.failed", orjson.dumps(event).decode(), event)
