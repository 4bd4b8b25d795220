"""HTTP turns: `POST /v1/responses` (and `/responses`, `/backend-api/codex/responses`) as a
turn, answered as SSE or as one JSON Response object.

The route does not own the upstream socket; it reads the turn's events and writes them out as
they come. Hypercorn cancels the route when its client disconnects; the response body's
`aclose` then abandons the turn, which cancels it in the socket's task and evicts the socket.
"""

from __future__ import annotations

import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from trioproxy import access, bigjson, keys, sse
from trioproxy.answers import error_response, json_response, with_headers
from trioproxy.context import AppContext
from trioproxy.errors import ApiError
from trioproxy.events import response_object
from trioproxy.metadata import for_tenant
from trioproxy.telemetry import request_id
from trioproxy.turnstream import OFF_LOOP_BYTES, TurnStream, off_loop
from trioproxy.validate import parse_request, require_unstored

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class SseBody:
    """The streaming body: upstream events as SSE blocks, then a flat `error` if it ended badly.

    A write downstream costs far more than an event (hypercorn's send lock, h11's chunk
    framing, a syscall), so after the first event a chunk keeps taking the events that are
    ready, and waits up to `_LINGER` scheduler rounds for more while a burst is still
    arriving; it goes out as soon as a round brings nothing. An event paced by the model
    waits only those rounds (microseconds when idle); a burst leaves as a few writes
    instead of one per event. The first chunk never waits: time to first event is the figure
    a user feels. A class rather than an async generator so that `aclose` abandons the turn
    even when the server is cancelled before it ever started iterating.
    """

    def __init__(self, stream: TurnStream) -> None:
        self._stream = stream
        self._done = False
        self._linger = 0  # no lingering before the first event has gone out

    def __aiter__(self) -> SseBody:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._stream.__anext__()
        except StopAsyncIteration:
            self._done = True
            last = self._ending()
            if not last:
                raise
            return last
        chunk = bytearray(sse.encode(event.type, event.raw))
        quiet = 0
        while len(chunk) < _CHUNK_BYTES:
            try:
                event = self._stream.next_nowait()
            except trio.WouldBlock:
                if quiet >= self._linger:
                    break
                quiet += 1
                await trio.lowlevel.checkpoint()
                continue
            except StopAsyncIteration:
                self._done = True
                chunk += self._ending()
                break
            quiet = 0
            chunk += sse.encode(event.type, event.raw)
        self._linger = _LINGER
        return bytes(chunk)

    def _ending(self) -> bytes:
        """The blocks after the upstream's last event: its terminal event, or the error."""
        end = self._stream.end
        if end.event is not None and end.error is None:
            return sse.encode(end.event.type, end.event.raw)
        if end.error is None:
            return b""
        blocks = sse.encode_json(end.error.sse_event(end.next_sequence))
        if end.begun is not None:
            blocks += sse.encode_json(end.error.failed_event(end.begun, end.next_sequence + 1))
        return blocks

    async def aclose(self) -> None:
        self._stream.abandon()


_LINGER = 2  # scheduler rounds a chunk waits for the next event of a burst
_CHUNK_BYTES = 64 * 1024  # a chunk goes out once this big, burst or not


async def collect(stream: TurnStream) -> Response:
    """A non-streaming answer: the final Response object, whatever its status, or the error."""
    try:
        async for _ in stream:
            pass
    finally:
        stream.abandon()
    end = stream.end
    if end.error is not None:
        return error_response(end.error)
    response = response_object(end.event) if end.event is not None else None
    if response is None:
        return error_response(
            ApiError(502, "upstream ended without a response", type="upstream_error")
        )
    return json_response(response)


def register(app: QuartTrio, ctx: AppContext) -> None:
    """The turn routes."""

    async def run_turn(route: access.Route) -> Response:
        headers = keys.normalise(request.headers.items())
        rid = request_id(headers)
        g.request_id = rid
        try:
            target, scope, data = await ctx.admitted(route, headers)
            body = await off_loop(len(data), parse_request, data)
            if target.chatgpt:
                body = require_unstored(body)
            ctx.proxy.request_bytes += len(data)
            try:
                stream = await ctx.proxy.open_turn(
                    body, headers, target, request_id=rid, request_bytes=len(data), scope=scope
                )
            finally:
                if len(data) > OFF_LOOP_BYTES:  # sent (or refused): its items are not needed
                    app.nursery.start_soon(trio.to_thread.run_sync, bigjson.release, body)
        except ApiError as exc:
            return error_response(exc)
        metadata = stream.turn.response_headers
        if scope is not None:
            metadata = for_tenant(metadata)
        g.turned = True  # the turn's own log line tells the rest
        if stream.first is None and stream.end.error is not None:
            stream.abandon()
            # Nothing streamed yet: a real HTTP error (with the upstream's rate-limit headers).
            return with_headers(error_response(stream.end.error), metadata)
        if body.get("stream") is True:
            sse_response = Response(SseBody(stream), status=200, headers=SSE_HEADERS)
            return with_headers(sse_response, metadata)
        return with_headers(await collect(stream), metadata)

    async def responses() -> Response:
        return await run_turn("responses")

    async def codex_responses() -> Response:
        return await run_turn("chatgpt")

    app.add_url_rule("/v1/responses", "responses", responses, methods=["POST"])
    app.add_url_rule("/responses", "responses_unversioned", responses, methods=["POST"])
    app.add_url_rule(
        "/backend-api/codex/responses", "codex_responses", codex_responses, methods=["POST"]
    )
