"""WebSocket turns: clients that speak the Responses WebSocket protocol themselves.

Codex with `supports_websockets = true` and the `openai` SDK's `client.responses.connect()`
open `ws(s)://{base_url}/responses` and send `response.create` messages. Each one becomes a turn
exactly like an HTTP request's: the same authentication, scopes, session keying and planning
(a full resend on a socket that holds the conversation goes as a suffix, a client's own
`previous_response_id` passes through), run on the session's pooled upstream socket by the task
that owns it. The events go back as text frames, byte for byte.

The client's socket is not the upstream's: when it closes between turns the upstream socket stays
pooled under its session, so a client that reconnects with the same session (or chains from its
last id without one) continues its `previous_response_id` chain. A client socket closed
mid-response cancels that response and evicts its upstream socket, as HTTP does.

Messages are taken in order, one turn at a time (the default lane). `stream_id` lanes and
`response.steer` need an upstream socket that carries several responses at once; until the pool
has that (lanes), such messages are answered with a clear error rather than dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import orjson
import trio
from quart import Response, websocket
from quart_trio import QuartTrio

from trioproxy import access, bigjson, keys
from trioproxy.answers import error_response
from trioproxy.context import AppContext
from trioproxy.errors import ApiError
from trioproxy.proxy import Proxy, TurnStream, off_loop
from trioproxy.targets import Target
from trioproxy.telemetry import request_id
from trioproxy.validate import check_body, check_headers, require_unstored

log = logging.getLogger("trioproxy.wsturns")

# Close code (RFC 6455) for a client whose credentials are refused: policy violation.
CLOSE_POLICY = 1008
# Messages a client may send ahead while a turn runs (Codex and the SDK send none).
_QUEUED = 16


def error_frame(error: ApiError, stream_id: str | None = None) -> str:
    """The nested `error` event the WebSocket protocol uses."""
    event: dict[str, Any] = {"type": "error", "status": error.status, **error.body()}
    if stream_id is not None:
        event["stream_id"] = stream_id
    return orjson.dumps(event).decode()


async def serve(proxy: Proxy, gate: access.Gate, route: access.Route) -> None:
    """One client WebSocket, from its upgrade to its close."""
    headers = keys.normalise(websocket.headers.items())
    try:
        target, scope = gate.resolve(headers, route)
        check_headers(headers)
    except ApiError as exc:
        await websocket.accept()
        await websocket.send(error_frame(exc))
        await websocket.close(CLOSE_POLICY if exc.status in (401, 403) else 1000, exc.code or "")
        return
    await websocket.accept()
    proxy.telemetry.websocket_clients += 1
    queued = Queued(proxy.settings.max_body_bytes)
    try:
        while True:
            data = queued.take()
            if data is None:
                raw: str | bytes | None = None
                with trio.move_on_after(proxy.settings.websocket_idle_timeout):
                    raw = await websocket.receive()  # only the wait for a message is bounded
                if raw is None:
                    await websocket.close(1000, "idle")
                    return
                data = raw.encode() if isinstance(raw, str) else raw
            async with trio.open_nursery() as nursery:
                # Messages sent while a turn runs are read (in order) and held here, bounded,
                # rather than left to pile up in the server's own unbounded-in-bytes queues.
                nursery.start_soon(queued.fill)
                await _message(proxy, target, scope, headers, data)
                nursery.cancel_scope.cancel()
    finally:
        proxy.telemetry.websocket_clients -= 1


class Queued:
    """Client messages that arrived while a turn ran: taken in order once it ends. At most
    `limit` bytes and `_QUEUED` messages; a client past that is closed (1008)."""

    def __init__(self, limit: int) -> None:
        self._messages: deque[bytes] = deque()
        self._bytes = 0
        self._limit = limit

    def take(self) -> bytes | None:
        if not self._messages:
            return None
        data = self._messages.popleft()
        self._bytes -= len(data)
        return data

    async def fill(self) -> None:
        while True:
            raw = await websocket.receive()
            data = raw.encode() if isinstance(raw, str) else raw
            self._messages.append(data)
            self._bytes += len(data)
            if self._bytes > self._limit or len(self._messages) > _QUEUED:
                await websocket.close(CLOSE_POLICY, "too many messages while a response runs")
                return


async def _message(
    proxy: Proxy,
    target: Target,
    scope: str | None,
    headers: list[tuple[str, str]],
    data: bytes,
) -> None:
    """One client message: a `response.create` runs as a turn; anything else is answered."""
    try:
        message = await off_loop(len(data), parse_request_event, data)
    except ApiError as exc:
        await websocket.send(error_frame(exc))
        return
    kind = message.pop("type")
    stream_id = message.get("stream_id")
    if kind != "response.create" or stream_id is not None:
        what = "lanes (`stream_id`)" if stream_id is not None else f"`{kind}`"
        refused = ApiError(
            400,
            f"{what} are not supported by this proxy yet; send `response.create` on the "
            "default lane.",
            type="invalid_request_error",
            code="unsupported_event",
        )
        await websocket.send(
            error_frame(refused, stream_id if isinstance(stream_id, str) else None)
        )
        return
    try:
        body = message
        if target.chatgpt:
            body = require_unstored(body)
        proxy.request_bytes += len(data)
        stream = await proxy.open_turn(
            body,
            headers,
            target,
            request_id=request_id(headers),
            request_bytes=len(data),
            scope=scope,
            client="websocket-in",
        )
    except ApiError as exc:
        await websocket.send(error_frame(exc))
        return
    await relay(stream)


def parse_request_event(data: bytes) -> dict[str, Any]:
    """A client message as an object with a string `type`; a `response.create` is checked
    like an HTTP request's body (and parsed as one: a large one in steps, bigjson.py)."""
    try:
        message = bigjson.loads(data)
    except ValueError as exc:
        raise ApiError(400, f"The message is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ApiError(
            400, "A message must be an object with a string `type`.", code="invalid_type"
        )
    if message["type"] == "response.create":
        check_body(message)  # the same checks as POST /v1/responses
    return message


async def relay(stream: TurnStream) -> None:
    """The turn's events as text frames, then its end: the upstream's terminal event as it
    came, or a nested `error` for an end the proxy had to make."""
    try:
        async for event in stream:
            await websocket.send(event.raw)
        end = stream.end
        if end.event is not None:
            await websocket.send(end.event.raw)
        elif end.error is not None:
            await websocket.send(error_frame(end.error))
    finally:
        stream.abandon()  # a client gone mid-response: cancel it, evict the socket


def register(app: QuartTrio, ctx: AppContext) -> None:
    """WebSocket upgrades on the three responses routes: served, or 426 when
    `websocket_clients` is off."""

    async def refuse_upgrade() -> Response:
        """`websocket_clients` off: 426 at once, so a client that tries a WebSocket (Codex
        with `supports_websockets = true`) falls back to HTTP without waiting or retrying."""
        ctx.telemetry.refused_upgrades += 1
        error = ApiError(
            426,
            "This proxy serves the Responses API over HTTP (POST with SSE), not WebSocket; "
            "it keeps the upstream WebSocket for you.",
            type="invalid_request_error",
            code="websocket_not_supported",
        )
        return error_response(error)

    async def websocket_responses() -> Response | None:
        await serve(ctx.proxy, ctx.gate, "responses")
        return None

    async def websocket_codex() -> Response | None:
        await serve(ctx.proxy, ctx.gate, "chatgpt")
        return None

    for path, route in (
        ("/v1/responses", websocket_responses),
        ("/responses", websocket_responses),
        ("/backend-api/codex/responses", websocket_codex),
    ):
        app.add_websocket(
            path,
            f"websocket{path}",
            route if ctx.settings.websocket_clients else refuse_upgrade,
        )
