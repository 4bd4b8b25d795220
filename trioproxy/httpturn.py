"""One turn over HTTP: `POST {base}/responses` with `stream: true`, its SSE relayed as events.

The fallback transport. Like a socket task it runs in the registry's nursery (so shutdown
reaches it), owns its one connection, feeds the turn's bounded channel and always finishes the
turn: completed, failed, an upstream error, or an end the proxy had to make (timeout, a stream
cut short, the client gone). The request is the client's own body with `stream: true`: over
HTTP there is no socket to chain on, so the full input goes every time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import trio

from trioproxy import errors, httpclient, sse
from trioproxy.config import Settings
from trioproxy.events import parse_frame
from trioproxy.metadata import client_metadata
from trioproxy.turn import Turn, TurnEnd, broken_end, terminal_end

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class HttpExchange:
    """What the turn log and metrics know of an HTTP turn's carrier (a socket's stand-in)."""

    key: str | None
    id: int = 0
    one_turn: bool = True

    @classmethod
    def new(cls, key: str | None) -> HttpExchange:
        return cls(key, next(_ids))


async def run(
    turn: Turn,
    url: str,
    headers: list[tuple[str, str]],
    settings: Settings,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> TurnEnd:
    """Run the turn to its end and finish it; the end is also returned."""
    task_status.started()
    try:
        end = await _exchange(turn, url, headers, settings)
    except BaseException:
        turn.finish(
            broken_end("socket", errors.upstream_closed("closed by the proxy"), turn.tracker)
        )
        raise
    turn.finish(end)
    return end


async def _exchange(
    turn: Turn, url: str, headers: list[tuple[str, str]], settings: Settings
) -> TurnEnd:
    tracker = turn.tracker
    request_headers = [
        *headers,
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
    ]
    with turn.scope, trio.move_on_after(settings.turn_timeout) as whole:
        try:
            return await _post(turn, url, request_headers, settings)
        except httpclient.HttpError as exc:
            return broken_end("socket", errors.upstream_unreachable(str(exc)), tracker)
        except ValueError as exc:
            return broken_end("socket", errors.upstream_protocol(str(exc)), tracker)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return TurnEnd("abandoned")  # the client closed its end of the channel
    if whole.cancelled_caught:
        return broken_end("timeout", errors.turn_timeout(settings.turn_timeout), tracker)
    return TurnEnd("abandoned")  # the client went away: `abandon` cancelled the turn


async def _post(
    turn: Turn, url: str, headers: list[tuple[str, str]], settings: Settings
) -> TurnEnd:
    """The request and its answer; the head must come within the read timeout."""
    silent = errors.upstream_silent(settings.read_timeout)
    with trio.CancelScope(deadline=trio.current_time() + settings.read_timeout) as head:
        async with httpclient.stream("POST", url, headers=headers, body=turn.payload) as response:
            head.deadline = float("inf")
            turn.response_headers = client_metadata(response.headers)
            if response.status != 200:
                body = await response.read(1 << 16)
                return TurnEnd(
                    "error", error=errors.from_handshake_rejection(response.status, body)
                )
            return await _relay(turn, response, settings)
    return broken_end("timeout", silent, turn.tracker)  # no response head in time


async def _relay(turn: Turn, response: httpclient.StreamingResponse, settings: Settings) -> TurnEnd:
    tracker = turn.tracker
    decoder = sse.Decoder(settings.max_message_bytes)
    chunks = response.chunks()
    while True:
        chunk = b""
        with trio.move_on_after(settings.read_timeout) as silent:
            chunk = await anext(chunks, b"")
        if silent.cancelled_caught:
            return broken_end("timeout", errors.upstream_silent(settings.read_timeout), tracker)
        if not chunk:
            closed = errors.upstream_closed("the HTTP stream ended before the response did")
            return broken_end("socket", closed, tracker)
        for data in decoder.feed(chunk):
            event = parse_frame(data)
            kind = tracker.feed(event)
            if kind is not None:
                return terminal_end(kind, event, tracker, turn.plan)
            await turn.deliver(event)
