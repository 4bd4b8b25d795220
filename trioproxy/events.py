"""Upstream event parsing and per-turn bookkeeping. Pure.

Each WebSocket text frame is one Responses event. It is parsed once (orjson) so the connection
can see its type, collect output items and spot the end of the turn; the frame text itself is
what the client receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from trioproxy.errors import ApiError, from_error_event

EndKind = Literal["completed", "failed", "incomplete", "cancelled", "error"]

TERMINAL: dict[str, EndKind] = {
    "response.completed": "completed",
    "response.failed": "failed",
    "response.incomplete": "incomplete",
    "response.cancelled": "cancelled",
    "error": "error",
}


@dataclass(frozen=True, slots=True)
class UpstreamEvent:
    """One upstream event: its type, its JSON text as received, and the parsed object."""

    type: str
    raw: str
    data: dict[str, Any]


def parse_frame(frame: str | bytes) -> UpstreamEvent:
    """Parse one frame; raise ValueError for anything that is not a typed JSON object."""
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ValueError("not an event object with a string `type`")
    raw = frame if isinstance(frame, str) else frame.decode()
    return UpstreamEvent(data["type"], raw, data)


@dataclass(slots=True)
class TurnTracker:
    """Follows one turn's events: output items, last sequence number, and how it ended."""

    output: dict[int, Any] = field(default_factory=dict)
    last_sequence: int = -1
    response: dict[str, Any] | None = None  # as `response.created`/`in_progress` told the client

    def feed(self, event: UpstreamEvent) -> EndKind | None:
        """Record `event`; return how the turn ended if this event ends it."""
        data = event.data
        seq = data.get("sequence_number")
        if isinstance(seq, int):
            self.last_sequence = seq
        if event.type in ("response.created", "response.in_progress"):
            response = data.get("response")
            self.response = response if isinstance(response, dict) else self.response
        if event.type == "response.output_item.done":
            index = data.get("output_index")
            self.output[index if isinstance(index, int) else len(self.output)] = data.get("item")
        return TERMINAL.get(event.type)

    def output_items(self, end: UpstreamEvent) -> list[Any]:
        """The response's output items: the final response's list, else the streamed ones."""
        return self.output_forms(end)[0]

    def output_forms(self, end: UpstreamEvent) -> tuple[list[Any], dict[int, Any]]:
        """(the response's output items, their streamed `output_item.done` forms by index).

        Some backends send `response.completed` with an empty `output` and rely on the
        `output_item.done` events; both are honoured (the streamed items are then the output
        and there is no second form). Live reasoning models send a reasoning item's
        ciphertext differently in the two places (DESIGN.md section 2b).
        """
        response = end.data.get("response")
        final = response.get("output") if isinstance(response, dict) else None
        if isinstance(final, list) and final:
            return final, self.output
        return [self.output[i] for i in sorted(self.output)], {}

    @property
    def next_sequence(self) -> int:
        return self.last_sequence + 1


def response_object(end: UpstreamEvent) -> dict[str, Any] | None:
    """The Response object a terminal `response.*` event carries."""
    response = end.data.get("response")
    return response if isinstance(response, dict) else None


def response_id(end: UpstreamEvent) -> str | None:
    response = response_object(end)
    value = response.get("id") if response is not None else None
    return value if isinstance(value, str) else None


def error_of(end: UpstreamEvent) -> ApiError:
    """The client-facing error for an upstream `error` event."""
    return from_error_event(end.data)
