"""Lanes (`stream_id`) and steering (`response.steer`) on one fake upstream socket.

OpenAI's WebSocket mode runs each lane's requests FIFO without overlap and interleaves the
events of different lanes; a connection runs at most 16 responses at once (further creates
wait their turn) and accepts 32 distinct named lanes (the default lane does not count). A
client may steer a running response: the server accepts the input, ends the response at its
next safe boundary with `response.incomplete` (reason `steered`) and starts a successor on the
same lane with the steered input. This module is the per-socket bookkeeping and the pure
checks and event shapes; `server.py` drives it. The shapes follow the SDK's
`responses_server_event.py` and `response_steer_*_event.py` (tests validate them).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from trioproxy.fake.events import new_id, response_object, usage

STREAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,256}")
MAX_ACTIVE = 16  # responses running at once on one connection
MAX_NAMED = 32  # distinct named stream ids a connection accepts
TERMINALS = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
_STEER_FIELDS = frozenset({"type", "previous_response_id", "input"})
_MESSAGE_FIELDS = frozenset({"type", "role", "content"})
_PARTS = frozenset({"input_text", "input_image", "input_file"})


def request_error(
    status: int, code: str, message: str, stream_id: Any = None, param: str | None = None
) -> dict[str, Any]:
    """A request-level `error` event (the SDK's `ResponseWsError`), echoing a string lane id."""
    error = {"type": "invalid_request_error", "code": code, "message": message, "param": param}
    event: dict[str, Any] = {"type": "error", "status": status, "error": error}
    if isinstance(stream_id, str):
        event["stream_id"] = stream_id
    return event


def requested_lane(message: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The lane a `response.create` names (None: the default lane), or the error refusing it.

    An omitted or null `stream_id` is the default lane; any other non-matching value is
    `invalid_stream_id`.
    """
    sid = message.get("stream_id")
    if sid is None:
        return None, None
    if isinstance(sid, str) and STREAM_ID.fullmatch(sid):
        return sid, None
    text = "stream_id must be 1-256 ASCII letters, digits, underscores, hyphens or periods."
    return None, request_error(400, "invalid_stream_id", text, sid, "stream_id")


def steer_problem(message: dict[str, Any]) -> str | None:
    """Why a `response.steer` is `invalid_input`, or None when it is well formed."""
    extra = sorted(set(message) - _STEER_FIELDS)
    if extra:
        return f"response.steer accepts only type, previous_response_id and input, not {extra}."
    target = message.get("previous_response_id")
    if not isinstance(target, str) or not target:
        return "previous_response_id must be a response id."
    value = message.get("input")
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not value:
        return "input must be a string or a non-empty list of user messages."
    for item in value:
        problem = _message_problem(item)
        if problem:
            return problem
    return None


def _message_problem(item: Any) -> str | None:
    if not isinstance(item, dict) or set(item) - _MESSAGE_FIELDS:
        return "each steering item must be a message with only type, role and content."
    if item.get("type", "message") != "message" or item.get("role") != "user":
        return "steering accepts only user messages."
    content = item.get("content")
    if isinstance(content, str):
        return None
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") in _PARTS for part in content
    ):
        return None
    return "content must be a string or a list of input_text, input_image and input_file parts."


@dataclass(frozen=True, slots=True)
class Steer:
    """One accepted steering submission."""

    id: str
    previous_response_id: str
    input: Any  # as the client sent it: a string or a list of user messages

    def items(self) -> list[dict[str, Any]]:
        """The input as `response.create` input items."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [{"type": "message", **item} for item in self.input]


def steer_items(steers: list[Steer]) -> list[dict[str, Any]]:
    return [item for steer in steers for item in steer.items()]


def steer_accepted(steer: Steer) -> dict[str, Any]:
    return {
        "type": "response.steer.accepted",
        "sequence_number": 0,
        "steer": {"id": steer.id, "previous_response_id": steer.previous_response_id},
    }


def steer_failed(
    code: str, message: str, target: str, value: Any, steer_id: str | None = None
) -> dict[str, Any]:
    """`response.steer.failed`, returning the uncommitted input as it was sent."""
    steer: dict[str, Any] = {"input": value, "previous_response_id": target}
    if steer_id is not None:
        steer["id"] = steer_id
    return {
        "type": "response.steer.failed",
        "sequence_number": 0,
        "error": {"code": code, "message": message, "type": "invalid_request_error"},
        "steer": steer,
    }


def steer_pending(steer: Steer, required: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "response.steer.pending",
        "sequence_number": 0,
        "reason": "waiting_for_required_input",
        "required_input": required,
        "steer": {"id": steer.id, "previous_response_id": steer.previous_response_id},
    }


class Progress:
    """The output a response has streamed so far, rebuilt from its events: what a steered
    `response.incomplete` carries (a half-streamed item marked `incomplete`)."""

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}

    def add(self, event: dict[str, Any]) -> None:
        kind, index = event["type"], event.get("output_index")
        if not isinstance(index, int):
            return
        if kind in ("response.output_item.added", "response.output_item.done"):
            self.items[index] = copy.deepcopy(event["item"])
            return
        item = self.items.get(index)
        if item is None:
            return
        if kind == "response.content_part.added":
            item.setdefault("content", []).append(copy.deepcopy(event["part"]))
        elif kind == "response.output_text.delta" and item.get("content"):
            item["content"][event["content_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            item["arguments"] = item.get("arguments", "") + event["delta"]
        elif kind == "response.reasoning_summary_part.added":
            item.setdefault("summary", []).append(copy.deepcopy(event["part"]))
        elif kind == "response.reasoning_summary_text.delta" and item.get("summary"):
            item["summary"][event["summary_index"]]["text"] += event["delta"]

    def output(self) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self.items):
            item = dict(self.items[index])
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"
            out.append(item)
        return out

    def calls(self) -> list[dict[str, Any]]:
        """Stubs for the function calls the client must answer (`required_input`)."""
        return [
            {"type": "function_call_output", "call_id": item["call_id"], "name": item["name"]}
            for item in self.output()
            if item.get("type") == "function_call"
        ]


@dataclass(eq=False)
class Running:
    """A response streaming on a socket: its numbering, lane tag and pending steers."""

    rid: str
    stream_id: str | None
    request: dict[str, Any]
    conversation: list[Any]
    send: Callable[[str], Awaitable[None]]  # one text frame onto the socket
    seq: int = 0
    terminal: str | None = None  # the type of the terminal event sent, once sent
    steers: list[Steer] = field(default_factory=list)
    outbox: deque[dict[str, Any]] = field(default_factory=deque)  # steer events to interject
    progress: Progress = field(default_factory=Progress)
    _wake: trio.Event = field(default_factory=trio.Event)

    @property
    def interruptible(self) -> bool:
        """Steering ends the response early unless a function call has begun: the client
        owes that call's output, so the steer waits (`response.steer.pending`)."""
        return not self.progress.calls() and self.terminal is None

    def stamp(self, event: dict[str, Any]) -> None:
        """Number the event in this response's sequence, tag its lane and note its output."""
        if "sequence_number" in event:
            event["sequence_number"] = self.seq
            self.seq += 1
        if self.stream_id is not None:
            event["stream_id"] = self.stream_id
        if event["type"] in TERMINALS:
            self.terminal = event["type"]
        self.progress.add(event)

    async def emit(self, event: dict[str, Any]) -> None:
        self.stamp(event)
        await self.send(json.dumps(event))

    async def stream(self, events: list[dict[str, Any]], delay: float) -> bool:
        """Send events paced by `delay`, steer events between them; True once steered."""
        for event in events:
            await self.pause(delay)
            if await self.interject():
                return True
            await self.emit(event)
        return False

    async def interject(self) -> bool:
        """Send the steer events queued for this response; whether steering now ends it."""
        while self.outbox:
            await self.emit(self.outbox.popleft())
        return bool(self.steers) and self.interruptible

    def push(self, event: dict[str, Any]) -> None:
        """Queue a steer event for this response's sender, and wake it from its pacing."""
        self.outbox.append(event)
        self._wake.set()

    async def pause(self, delay: float) -> None:
        """Wait `delay` (math.inf: until steered) between events; a steer cuts it short."""
        if delay > 0 and not self.outbox:
            with trio.move_on_after(delay):
                await self._wake.wait()
        self._wake = trio.Event()

    async def steered(self) -> None:
        """Wait for a steer (a stalled response is otherwise silent forever)."""
        await self.pause(math.inf)

    def incomplete(self) -> dict[str, Any]:
        """The `response.incomplete` that ends a steered response, with the output so far."""
        output = self.progress.output()
        spent = usage(len(str(self.conversation)), 0, len(str(output)))
        response = response_object(self.rid, self.request, "incomplete", output, spent)
        response["incomplete_details"] = {"reason": "steered"}
        return {"type": "response.incomplete", "sequence_number": 0, "response": response}


@dataclass(eq=False)
class Lane:
    stream_id: str | None
    waiting: deque[dict[str, Any]] = field(default_factory=deque)
    draining: bool = False  # a task is running this lane's requests


class Lanes:
    """One socket's lanes, its 16 response slots, its running responses and the steering
    input waiting for a client's tool output."""

    def __init__(self, named_limit: int = MAX_NAMED) -> None:
        self.named_limit = named_limit
        self.lanes: dict[str | None, Lane] = {}
        self.named: list[str] = []  # distinct named ids, in order of first use
        self.slots = trio.Semaphore(MAX_ACTIVE)
        self.active = 0
        self.running: dict[str, Running] = {}
        self.lane_of: dict[str, str | None] = {}  # every response started on this socket
        self.pending: dict[str, list[Steer]] = {}  # parent id -> steers awaiting tool output

    @property
    def busy(self) -> bool:
        return any(lane.draining for lane in self.lanes.values())

    def admit(self, sid: str | None) -> dict[str, Any] | None:
        """Count a named lane; the error refusing a 33rd distinct id."""
        if sid is None or sid in self.named:
            return None
        if len(self.named) >= self.named_limit:
            text = f"This connection already uses {self.named_limit} distinct stream ids."
            return request_error(400, "websocket_stream_limit_reached", text, sid, "stream_id")
        self.named.append(sid)
        return None

    def enqueue(self, sid: str | None, request: dict[str, Any]) -> Lane | None:
        """Queue a request on its lane; the lane when it needs a task to drain it."""
        lane = self.lanes.setdefault(sid, Lane(sid))
        lane.waiting.append(request)
        if lane.draining:
            return None
        lane.draining = True
        return lane

    def start(
        self,
        rid: str,
        sid: str | None,
        request: dict[str, Any],
        conversation: list[Any],
        send: Callable[[str], Awaitable[None]],
    ) -> Running:
        run = Running(rid, sid, request, conversation, send)
        self.running[rid] = run
        self.lane_of[rid] = sid
        return run

    def steer(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Route a `response.steer`: its answer goes into its running target's outbox (sent
        in line with that response's events), or is returned to send at once."""
        target = message.get("previous_response_id")
        rid = target if isinstance(target, str) else ""
        run = self.running.get(rid)
        event = self._answer(message, rid, run)
        if run is not None:
            run.push(event)
            return None
        sid = self.lane_of.get(rid)
        if sid is not None:
            event["stream_id"] = sid
        return event

    def _answer(self, message: dict[str, Any], rid: str, run: Running | None) -> dict[str, Any]:
        """`response.steer.accepted` (the steer queued on `run`) or `response.steer.failed`."""
        problem = steer_problem(message)
        if problem:  # the input returned exactly as sent
            return steer_failed("invalid_input", problem, rid, message.get("input", ""))
        value = message["input"]
        if isinstance(value, list):  # a message's optional `type` filled in, as the SDK types it
            value = [{"type": "message", **item} for item in value]
        if run is not None:
            steer = Steer(new_id("steer"), rid, value)
            run.steers.append(steer)
            return steer_accepted(steer)
        if rid in self.lane_of:
            text = f"Response '{rid}' has already completed."
            return steer_failed("response_already_completed", text, rid, value)
        text = f"Response '{rid}' is not available on this connection."
        return steer_failed("response_not_found", text, rid, value)

    def conclude(self, run: Running) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """End `run`: the successor request its accepted steers start, and steer events still
        to send on its lane. Later steers find it finished."""
        self.running.pop(run.rid, None)
        steers, run.steers = run.steers, []
        if not steers:
            return None, []
        if run.terminal not in ("response.completed", "response.incomplete"):
            text = "The response ended without a successor."
            failed = [
                steer_failed("response_not_active", text, s.previous_response_id, s.input, s.id)
                for s in steers
            ]
            return None, failed
        calls = run.progress.calls()
        if calls and run.terminal == "response.completed":
            self.pending.setdefault(run.rid, []).extend(steers)
            return None, [steer_pending(steer, calls) for steer in steers]
        inherited = {
            k: v
            for k, v in run.request.items()
            if k not in ("input", "previous_response_id", "generate")
        }
        successor = {**inherited, "input": steer_items(steers), "previous_response_id": run.rid}
        return successor, []
