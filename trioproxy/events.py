"""Upstream event parsing and per-turn bookkeeping. Pure.

Each WebSocket text frame is one Responses event. It is parsed once (orjson) so the connection
can see its type, collect output items and spot the end of the turn; the frame text itself is
what the client receives.
"""

from __future__ import annotations

import re
from collections.abc import Collection
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


# The protocol's event types (`response.output_text.delta`, `error`, `codex.rate_limits`): the
# type is written into the SSE `event:` line, so nothing else may pass (a line break there
# would let an upstream forge events).
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
# Events that open a response and name it.
_OPENERS = frozenset({"response.created", "response.queued", "response.in_progress"})
# Steering's answers (`response.steer`): about a response, never a response's own event.
STEER_EVENTS = frozenset(
    {"response.steer.accepted", "response.steer.failed", "response.steer.pending"}
)
# `response.*` events that may come without an opener: a response refused at once. Never
# `response.completed`: the one a late frame of an earlier turn on a kept socket would be.
_UNOPENED = frozenset({"response.failed", "response.incomplete", "response.cancelled"})


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
    if not _EVENT_TYPE.fullmatch(data["type"]):
        raise ValueError("an event `type` outside the protocol's characters")
    raw = frame if isinstance(frame, str) else frame.decode()
    return UpstreamEvent(data["type"], raw, data)


_LANE_KEY = '"stream_id"'
# What follows the key in a frame: the proxy's lane name as its value.
_LANE_VALUE = re.compile(r'\s*:\s*"[A-Za-z0-9_.-]{1,256}"')
_SPACE = " \t\r\n"


def without_lane(event: UpstreamEvent) -> UpstreamEvent:
    """The event without its `stream_id`: a lane the proxy chose is no client's business.

    Cut out of the frame's text when the key occurs once (only a key can: inside a string its
    quotes are escaped), so the other bytes go out as the upstream sent them and the event is
    not serialized again; otherwise the parsed event is serialized without it."""
    if "stream_id" not in event.data:
        return event
    lane = event.data.pop("stream_id")
    raw = event.raw
    at = raw.rfind(_LANE_KEY)  # usually the last key: the search ends at once
    value = _LANE_VALUE.match(raw, at + len(_LANE_KEY)) if at >= 0 else None
    if (
        value is not None
        and raw.find(_LANE_KEY) == at
        and isinstance(lane, str)
        and raw.endswith(f'"{lane}"', 0, value.end())  # the pair parsed, not a look-alike
    ):
        before = at
        while before > 0 and raw[before - 1] in _SPACE:
            before -= 1
        if before > 0 and raw[before - 1] == ",":  # `, "stream_id": "tp3"`
            return UpstreamEvent(event.type, raw[: before - 1] + raw[value.end() :], event.data)
        after = value.end()
        while after < len(raw) and raw[after] in _SPACE:
            after += 1
        if after < len(raw) and raw[after] == ",":  # `"stream_id": "tp3", ` (the first key)
            after += 1
            while after < len(raw) and raw[after] in _SPACE:
                after += 1
        return UpstreamEvent(event.type, raw[:at] + raw[after:], event.data)
    return UpstreamEvent(event.type, orjson.dumps(event.data).decode(), event.data)


@dataclass(slots=True)
class TurnTracker:
    """Follows one turn's events: output items, last sequence number, and how it ended."""

    output: dict[int, Any] = field(default_factory=dict)
    last_sequence: int = -1
    response: dict[str, Any] | None = None  # as `response.created`/`in_progress` told the client
    # Ids of responses the socket finished before this turn: one of them opening this turn is
    # a late frame of an earlier turn, not this turn's response.
    stale: Collection[str] = ()
    opened: bool = False
    # Steering (WebSocket clients): steers sent and not yet answered, steers accepted and not
    # yet committed. While either is outstanding, a terminal event does not end the turn: the
    # upstream may start a successor response that commits them (its `response.created`).
    steers_unanswered: int = 0
    steers_accepted: set[str] = field(default_factory=set)
    held_end: tuple[EndKind, UpstreamEvent] | None = None  # a terminal passed on, end pending
    successors: int = 0  # responses the upstream started after a steered one, in this turn
    earlier: list[str] = field(default_factory=list)  # ids of this turn's steered responses

    def feed(self, event: UpstreamEvent) -> EndKind | None:
        """Record `event`; return how the turn ended if this event ends it.

        Raises ValueError for an event that is not this turn's: a `response.*` event before
        the response was created, or one naming another response (a late frame of an earlier
        response must never pass for this one's)."""
        data = event.data
        seq = data.get("sequence_number")
        if isinstance(seq, int):
            self.last_sequence = seq
        kind = event.type
        if kind in STEER_EVENTS:
            return self._steered(kind, data)
        if kind in _OPENERS:
            if self.held_end is not None:
                self._successor(data.get("response"))
            self._opened(data.get("response"))
        elif not self.opened and kind.startswith("response."):
            self._unopened(kind, data.get("response"))
        elif kind == "response.output_item.done":
            index = data.get("output_index")
            self.output[index if isinstance(index, int) else len(self.output)] = data.get("item")
        end = TERMINAL.get(kind)
        if end is not None and end != "error":
            self._same(data.get("response"))
            if self.steering:
                self.held_end = (end, event)
                return None
        return end

    @property
    def steering(self) -> bool:
        """Whether steering sent during this turn may still start a successor response."""
        return self.steers_unanswered > 0 or bool(self.steers_accepted)

    def steer_sent(self) -> None:
        self.steers_unanswered += 1

    def _steered(self, kind: str, data: dict[str, Any]) -> EndKind | None:
        """Count a steering answer; the held end when nothing is outstanding any more."""
        steer = data.get("steer")
        sid = steer.get("id") if isinstance(steer, dict) else None
        if kind == "response.steer.accepted":
            self.steers_unanswered = max(0, self.steers_unanswered - 1)
            if isinstance(sid, str):
                self.steers_accepted.add(sid)
        elif kind == "response.steer.failed" and sid in self.steers_accepted:
            self.steers_accepted.discard(sid)
        elif kind == "response.steer.failed":
            self.steers_unanswered = max(0, self.steers_unanswered - 1)
        else:  # pending: the upstream keeps it for the client's next explicit create
            self.steers_accepted.discard(sid)
        if self.held_end is not None and not self.steering:
            return self.held_end[0]
        return None

    def _successor(self, response: Any) -> None:
        """A response the upstream started after this turn's one ended: it commits the
        accepted steering, and is this turn's from now on."""
        self.successors += 1
        if self.response is not None and isinstance(self.response.get("id"), str):
            self.earlier.append(self.response["id"])
        self.held_end = None
        self.steers_accepted.clear()
        self.response = None
        self.opened = False
        self.output = {}

    def _opened(self, response: Any) -> None:
        named = response.get("id") if isinstance(response, dict) else None
        if not self.opened and named in self.stale:
            raise ValueError(f"a late event of the earlier response {named!r}")
        self.opened = True
        if isinstance(response, dict):
            self._same(response)
            self.response = response

    def _unopened(self, kind: str, response: Any) -> None:
        named = response.get("id") if isinstance(response, dict) else None
        if kind not in _UNOPENED or named in self.stale:
            raise ValueError(f"`{kind}` before `response.created`: not this turn's response")

    def _same(self, response: Any) -> None:
        known = self.response.get("id") if self.response is not None else None
        named = response.get("id") if isinstance(response, dict) else None
        if known is not None and named is not None and named != known:
            raise ValueError(f"an event of response {named!r} inside response {known!r}")

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
