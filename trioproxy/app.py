"""The HTTP face: Quart-trio routes that turn requests into turns and turns into SSE or JSON.

The route does not own the upstream socket; it reads the turn's events and writes them out as
they come. Hypercorn cancels the route when its client disconnects; the response body's
`aclose` then abandons the turn, which cancels it in the socket's task and evicts the socket.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy import keys, sse
from trioproxy.config import Settings
from trioproxy.errors import ApiError
from trioproxy.events import response_object
from trioproxy.proxy import Proxy, TurnStream
from trioproxy.registry import Registry
from trioproxy.upstream import Connector, websocket_connector
from trioproxy.validate import parse_request

log = logging.getLogger("trioproxy.app")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status)


class SseBody:
    """The streaming body: upstream events as SSE blocks, then a flat `error` if it ended badly.

    A class rather than an async generator so that `aclose` abandons the turn even when the
    server is cancelled before it ever started iterating.
    """

    def __init__(self, stream: TurnStream) -> None:
        self._stream = stream
        self._done = False

    def __aiter__(self) -> SseBody:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._stream.__anext__()
        except StopAsyncIteration:
            self._done = True
            end = self._stream.end
            if end.event is not None and end.error is None:
                return sse.encode(end.event.type, end.event.raw)
            if end.error is not None:
                return sse.encode_json(end.error.sse_event(end.next_sequence))
            raise
        return sse.encode(event.type, event.raw)

    async def aclose(self) -> None:
        self._stream.abandon()


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


def create_app(
    settings: Settings | None = None, *, connector: Connector | None = None
) -> QuartTrio:
    """Build the ASGI app. The registry task starts with the server and stops with it."""
    settings = settings or Settings.from_env()
    app = QuartTrio("trioproxy")
    app.config.update(
        RESPONSE_TIMEOUT=None,  # a turn may stream for minutes; the turn has its own timeout
        BODY_TIMEOUT=60,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
    )
    registry = Registry(settings, connector or websocket_connector(settings))
    proxy = Proxy(settings, registry)
    app.extensions["trioproxy"] = proxy

    @app.before_serving
    async def start_registry() -> None:
        await app.nursery.start(registry.run)

    @app.after_serving
    async def stop_registry() -> None:
        await registry.aclose()

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(
            {
                "status": "ok",
                "upstream": settings.upstream_ws,
                **registry.stats(),
                "turns": dict(proxy.turns),
                "retries": dict(proxy.retries),
                "upstream_bytes": proxy.upstream_bytes,
            }
        )

    async def responses() -> Response:
        headers = keys.normalise(request.headers.items())
        if not any(name == "authorization" and value.strip() for name, value in headers):
            return error_response(
                ApiError(
                    401,
                    "Missing credentials: send the upstream API key as "
                    "'Authorization: Bearer <key>'.",
                    type="invalid_request_error",
                    code="missing_api_key",
                )
            )
        try:
            raw = await request.get_data(cache=False, as_text=False)
            body = parse_request(raw if isinstance(raw, bytes) else raw.encode())
            stream = await proxy.open_turn(body, headers)
        except ApiError as exc:
            return error_response(exc)
        if stream.first is None and stream.end.error is not None:
            stream.abandon()
            return error_response(stream.end.error)  # nothing streamed yet: a real HTTP error
        if body.get("stream") is True:
            return Response(SseBody(stream), status=200, headers=SSE_HEADERS)
        return await collect(stream)

    app.add_url_rule("/v1/responses", "responses", responses, methods=["POST"])
    app.add_url_rule("/responses", "responses_unversioned", responses, methods=["POST"])

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        return error_response(
            ApiError(
                code,
                exc.description or exc.name,
                type="invalid_request_error",
                code=exc.name.lower().replace(" ", "_"),
            )
        )

    return app
