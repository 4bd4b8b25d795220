"""What a socket's task takes besides turns, and where a client's loose frames go.

A WebSocket client of ours (wsturns.py) sends more than turns on its upstream socket: steering
and events this proxy does not know (`Notice`), and it hears the frames no running turn owns
(`Sink`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import trio

from trioproxy.events import UpstreamEvent
from trioproxy.turn import Turn


class Sink(Protocol):
    """Where an attached client's loose frames go; `offer` never waits (see wsturns.py)."""

    def offer(self, event: UpstreamEvent) -> None: ...


@dataclass(frozen=True, slots=True)
class Notice:
    """A client's message that is no turn (`response.steer`, an event this proxy does not
    know), sent on the socket its responses run on. `target`: the response a steer names, so
    that turn waits for the steering's outcome before it ends. `sink` and `refusal`: where
    its client hears, and what, if it cannot go (on a shared socket no client is attached)."""

    payload: bytes
    target: str | None = None
    owner: object | None = None
    sink: Sink | None = None
    refusal: UpstreamEvent | None = None
    settled: trio.Event = field(default_factory=trio.Event)  # sent, and answered if it may be


Job = Turn | Notice
