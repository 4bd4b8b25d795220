"""The trio load generator: N codex-shaped sessions at once against one contender.

Contenders differ only in how a turn travels:

- `direct`: WebSocket straight to the fake upstream, one socket per session, each later turn
  sent as `previous_response_id` + the new items (the floor the proxy can reach);
- `trioproxy`, `litellm`, `codex_lb`, `full_http`: HTTP/SSE with the whole conversation every
  turn, to the proxy, to LiteLLM, to codex-lb, or straight to the fake upstream's HTTP endpoint.

Per turn it records the time to first event and the events received; the run's wall time
gives turns/s and events/s.

By default the load is a closed loop: every session sends its next turn as soon as its last one
ended, so at saturation the time to first event is mostly queueing. With `rate` it is an open
loop over established sessions: every session sends its first turn (the full request and the
upstream handshake) at once and uncounted, then the later turns' starts are scheduled at a fixed
rate for the run as a whole (turn j >= 1 of session n at `((j - 1) * sessions + n) / rate`
seconds after the last first turn ended), whatever the contender's pace; a session still waits
for its own previous turn (a conversation cannot send its next turn before the last one ends),
and the starts that came late for that reason are counted.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import trio
from trio_websocket import open_websocket_url

from bench.scenario import continuation, first_request

TERMINAL = (b"response.completed", b"response.failed", b"response.incomplete")
TERMINAL_LINES = tuple(b"event: " + kind for kind in TERMINAL)
TERMINAL_TYPES = tuple(b'"type":"' + k + b'"' for k in TERMINAL) + tuple(
    b'"type": "' + k + b'"' for k in TERMINAL
)


@dataclass
class Result:
    contender: str
    sessions: int
    turns: int = 0
    events: int = 0
    errors: int = 0
    ttfe: list[float] = field(default_factory=list)  # seconds, one per turn
    wall: float = 0.0
    cut: bool = False  # the run hit its time budget; turns still running were not counted
    chunks: int = 0  # HTTP body reads: about one per write the server made
    first_error: str = ""
    frames: list[bytes] | None = None  # direct only, when asked: every frame it sent
    late: int = 0  # open loop: turns that started late, their session still busy

    def record_error(self, detail: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or detail[:300]


async def http_turn(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], r: Result
) -> list[Any]:
    """One turn over HTTP/SSE: returns the final response's output items.

    Reads raw chunks and splits SSE blocks on blank lines, parsing only the terminal event's
    JSON: the client stays cheap, so the contenders, not the load generator, set the pace.
    """
    started = time.perf_counter()
    terminal: bytes | None = None
    buffer = b""
    try:
        async with client.stream("POST", url, content=orjson.dumps(body), headers=headers) as reply:
            if reply.status_code != 200:
                r.record_error(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
                return []
            async for chunk in reply.aiter_raw():
                r.chunks += 1
                buffer += chunk
                *blocks, buffer = buffer.split(b"\n\n")
                for block in blocks:
                    if not block.strip():
                        continue
                    if started:
                        r.ttfe.append(time.perf_counter() - started)
                        started = 0.0
                    r.events += 1
                    # Some servers (LiteLLM) send `data:` lines without `event:` lines.
                    if block.startswith(TERMINAL_LINES) or any(k in block for k in TERMINAL_TYPES):
                        terminal = block.split(b"data: ", 1)[1]
    except trio.Cancelled:
        # Cut by the time budget while still waiting: the wait so far is a lower bound of
        # this turn's time to first event, and leaving it out would flatter the p99.
        if started:
            r.ttfe.append(time.perf_counter() - started)
        raise
    if terminal is None:
        r.record_error("stream ended without a terminal event")
        return []
    response = orjson.loads(terminal).get("response", {})
    if response.get("status") != "completed":
        r.record_error(f"turn ended {response.get('status')}")
    return list(response.get("output", []))


# Waits until turn j of a session may start (the open loop's schedule).
Pace = Callable[[int], Awaitable[None]]


async def unpaced(turn: int) -> None:
    return None


async def http_session(
    contender: str,
    base: str,
    n: int,
    turns: int,
    r: Result,
    client: httpx.AsyncClient,
    pace: Pace = unpaced,
) -> None:
    body = first_request(turns, n)
    body["stream"] = True
    headers = {
        "authorization": "Bearer sk-bench",
        "content-type": "application/json",
        "session-id": f"bench-{contender}-{n}-{time.monotonic_ns()}",
    }
    if contender == "litellm":
        body["model"] = "gpt-bench"
    for j in range(turns):
        await pace(j)
        output = await http_turn(client, f"{base}/responses", body, headers, r)
        r.turns += 1
        if not output:
            return
        body["input"] = [*body["input"], *continuation(output)]


async def direct_session(ws_url: str, n: int, turns: int, r: Result, pace: Pace = unpaced) -> None:
    """The physical limit: the client itself keeps the socket and sends suffixes."""
    body = first_request(turns, n)
    params = {k: v for k, v in body.items() if k not in ("input", "stream")}
    async with open_websocket_url(
        ws_url, extra_headers=[(b"authorization", b"Bearer sk-bench")], max_message_size=2**26
    ) as ws:
        message: dict[str, Any] = {"type": "response.create", **params, "input": body["input"]}
        for j in range(turns):
            await pace(j)
            started = time.perf_counter()
            frame_out = orjson.dumps(message)
            if r.frames is not None:
                r.frames.append(frame_out)
            await ws.send_message(frame_out.decode())
            first = True
            while True:
                frame = await ws.get_message()
                if first:
                    r.ttfe.append(time.perf_counter() - started)
                    first = False
                r.events += 1
                head = frame[:60] if isinstance(frame, str) else frame[:60].decode()
                if any(kind.decode() in head for kind in TERMINAL) or '"error"' in head:
                    event = orjson.loads(frame)
                    break
            r.turns += 1
            response = event.get("response") or {}
            if response.get("status") != "completed":
                r.record_error(f"direct turn ended {event.get('type')}")
                return
            added = continuation(response.get("output", []))
            outputs = [item for item in added if item["type"] == "function_call_output"]
            message = {
                "type": "response.create",
                **params,
                "previous_response_id": response["id"],
                "input": outputs,
            }


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


async def run(
    contender: str,
    target: str,
    sessions: int,
    turns: int,
    *,
    keep_frames: bool = False,
    budget: float = float("inf"),
    rate: float | None = None,
    on_start: Callable[[], None] | None = None,
) -> Result:
    """`sessions` sessions of `turns` turns at once; `target` is a base URL or, for direct,
    the fake upstream's WebSocket URL.

    A contender too slow to finish within `budget` seconds is cut there: its rates are the
    turns it completed over the budget, so a slow gateway cannot stretch the whole bench.

    With `rate` (turns/s for the whole run) the starts follow the open loop's fixed schedule
    (see the module's docstring) instead of each session's last turn; the result counts only
    the scheduled turns, its wall time from the schedule's start, when `on_start` is called.
    """
    r = Result(contender, sessions, frames=[] if keep_frames else None)
    started = time.perf_counter()
    origin = trio.current_time()
    unprimed = set(range(sessions))  # open loop: sessions still in their first turn
    primed = trio.Event()

    def prime(n: int) -> None:
        """Session `n` is past its first turn; the last one starts the clock."""
        nonlocal started, origin
        if n not in unprimed:
            return
        unprimed.discard(n)
        if unprimed:
            return
        r.ttfe.clear()
        r.events = r.turns = r.chunks = 0
        started, origin = time.perf_counter(), trio.current_time()
        if on_start is not None:
            on_start()
        primed.set()

    def pacer(n: int) -> Pace:
        if rate is None:
            return unpaced

        async def pace(turn: int) -> None:
            if turn == 0:
                return
            if turn == 1:
                prime(n)
                await primed.wait()
            due = origin + ((turn - 1) * sessions + n) / rate
            if trio.current_time() > due + 0.001:  # still busy with its own last turn
                r.late += 1
            await trio.sleep_until(due)

        return pace

    async def one(n: int) -> None:
        try:
            if contender == "direct":
                await direct_session(target, n, turns, r, pacer(n))
                return
            # A client per session, as a user's own process would have: httpcore's shared
            # pool scans every connection (a poll each) to place each request, under one
            # lock. At 64 sessions that took two thirds of the load generator's CPU and
            # queued turns for seconds, which the contenders' latency then carried. The TLS
            # context is shared: building one costs ~35 ms of CPU, which 64 clients starting
            # at once would have charged to the contenders' first turns.
            async with httpx.AsyncClient(verify=_tls(), timeout=httpx.Timeout(300.0)) as client:
                await http_session(contender, target, n, turns, r, client, pacer(n))
        except Exception as exc:  # a load run reports failures, it does not stop on them
            r.record_error(f"{type(exc).__name__}: {exc}")
        finally:
            if rate is not None:
                prime(n)  # a session that ended in its first turn holds no one up

    with trio.move_on_after(budget) as scope:
        async with trio.open_nursery() as nursery:
            for n in range(sessions):
                nursery.start_soon(one, n)
    r.cut = scope.cancelled_caught
    r.wall = time.perf_counter() - started
    return r
