"""The HTTP face: Quart-trio routes that turn requests into turns and turns into SSE or JSON.

The route does not own the upstream socket; it reads the turn's events and writes them out as
they come. Hypercorn cancels the route when its client disconnects; the response body's
`aclose` then abandons the turn, which cancels it in the socket's task and evicts the socket.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, g, has_request_context, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy import access, bigjson, errors, keys, sse, wsturns
from trioproxy.codex_auth import held_login
from trioproxy.config import Settings, redacted_url
from trioproxy.delta import client_chained
from trioproxy.errors import ApiError
from trioproxy.events import response_object
from trioproxy.managed import Managed
from trioproxy.metadata import for_tenant
from trioproxy.proxy import OFF_LOOP_BYTES, Proxy, TurnStream, off_loop
from trioproxy.registry import Registry
from trioproxy.relay import relay
from trioproxy.serving import WholeAnswers
from trioproxy.targets import Target, api_target, chatgpt_target, managed_targets
from trioproxy.telemetry import Telemetry, request_id
from trioproxy.upstream import Connector, websocket_connector
from trioproxy.validate import check_headers, parse_request, require_unstored

log = logging.getLogger("trioproxy.app")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def error_response(error: ApiError) -> Response:
    if has_request_context():
        g.error_code = error.code  # for the refusal's log line
    return json_response(error.body(), error.status)


def chained_id(body: bytes) -> str | None:
    """The `previous_response_id` a relayed body names (compaction carries one), if any."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None  # not ours to judge: the upstream refuses it
    return client_chained(parsed) if isinstance(parsed, dict) else None


def _has_body(headers: Any) -> bool:
    """Whether a request comes with a body (one the route may not have read)."""
    length = headers.get("content-length")
    return (length is not None and length.strip() not in ("", "0")) or (
        "chunked" in headers.get("transfer-encoding", "").lower()
    )


def with_headers(response: Response, headers: list[tuple[str, str]]) -> Response:
    """The upstream's response metadata (metadata.py) added to the client's answer."""
    for name, value in headers:
        response.headers.add(name, value)
    return response


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


def create_app(
    settings: Settings | None = None,
    *,
    connector: Connector | None = None,
    managed: Managed | None = None,
) -> QuartTrio:
    """Build the ASGI app. The registry task starts with the server and stops with it."""
    settings = settings or Settings.from_env()
    app = QuartTrio("trioproxy")
    app.asgi_http_class = WholeAnswers
    app.config.update(
        RESPONSE_TIMEOUT=None,  # a turn may stream for minutes; the turn has its own timeout
        BODY_TIMEOUT=settings.body_timeout,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
    )
    telemetry = Telemetry()
    registry = Registry(settings, connector or websocket_connector(settings), telemetry)
    proxy = Proxy(settings, registry, telemetry)
    app.extensions["trioproxy"] = proxy
    login = held_login(settings)
    app.extensions["trioproxy.login"] = login
    if managed is not None and login is not None:
        raise ValueError("managed keys and --codex-auth cannot be combined")
    gate = access.Gate(
        api=api_target(settings),
        chatgpt=chatgpt_target(settings),
        held=chatgpt_target(settings, login) if login is not None else None,
        managed=managed,
        channels=managed_targets(settings, managed) if managed is not None else {},
        local_key=settings.api_key,
        chatgpt_routes=settings.chatgpt_routes,
    )
    telemetry.watch(proxy, registry, lambda: login.refreshes if login is not None else 0)

    @app.before_serving
    async def start_registry() -> None:
        await app.nursery.start(registry.run)

    @app.after_serving
    async def stop_registry() -> None:
        await registry.aclose()

    @app.before_request
    async def refuse_while_draining() -> Response | None:
        """Shutting down: new work gets a 503 at once (a balancer retries elsewhere) while
        the turns already running finish; health checks say so too. `Connection: close`, so a
        keep-alive client does not send its next request down a connection about to go."""
        if registry.draining and request.path != "/metrics":
            refused = error_response(errors.shutting_down())
            refused.headers["Connection"] = "close"
            return refused
        return None

    @app.before_request
    async def guard_status_routes() -> Response | None:
        """`metrics_key` set: /healthz and /metrics answer only a client that presents it (the
        pool's size, tenants' turn counts and token totals are an operator's business)."""
        if not settings.metrics_key or request.path not in ("/healthz", "/metrics"):
            return None
        presented = keys.bearer(keys.normalise(request.headers.items()))
        if hmac.compare_digest(presented.encode(), settings.metrics_key.encode()):
            return None
        return error_response(
            ApiError(
                401,
                "This route needs the metrics key: "
                "'Authorization: Bearer <TRIOPROXY_METRICS_KEY>'.",
                code="invalid_api_key",
            )
        )

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response(
            {
                "status": "ok",
                "upstream": redacted_url(settings.upstream_ws) if managed is None else None,
                "channels": {
                    name: redacted_url(target.url) for name, target in gate.channels.items()
                },
                "chatgpt_upstream": redacted_url(settings.chatgpt_ws),
                "held_login": login is not None,
                **registry.stats(),
                "turns": dict(proxy.turns),
                "placements": dict(proxy.placements),
                "retries": dict(proxy.retries),
                "request_bytes": proxy.request_bytes,
                "upstream_bytes": proxy.upstream_bytes,
                "upstream_wire_bytes": telemetry.wire_bytes,
                "suffix_saved_bytes": telemetry.saved_bytes,
                "input_tokens": telemetry.input_tokens,
                "cached_tokens": telemetry.cached_tokens,
                "token_refreshes": login.refreshes if login is not None else 0,
                "websocket_upgrades_refused": telemetry.refused_upgrades,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(telemetry.scrape(), content_type=CONTENT_TYPE_LATEST)

    async def admitted(
        route: access.Route, headers: list[tuple[str, str]]
    ) -> tuple[Target, str | None, bytes]:
        """Who sent it and where it goes, then its body; raises the `ApiError` a refusal is."""
        target, scope = gate.resolve(headers, route)
        check_headers(headers)
        raw = await request.get_data(cache=False, as_text=False)
        g.body_read = True
        return target, scope, raw if isinstance(raw, bytes) else raw.encode()

    async def run_turn(route: access.Route) -> Response:
        headers = keys.normalise(request.headers.items())
        rid = request_id(headers)
        g.request_id = rid
        try:
            target, scope, data = await admitted(route, headers)
            body = await off_loop(len(data), parse_request, data)
            if target.chatgpt:
                body = require_unstored(body)
            proxy.request_bytes += len(data)
            try:
                stream = await proxy.open_turn(
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

    async def refuse_upgrade() -> Response:
        """`websocket_clients` off: 426 at once, so a client that tries a WebSocket (Codex
        with `supports_websockets = true`) falls back to HTTP without waiting or retrying."""
        telemetry.refused_upgrades += 1
        error = ApiError(
            426,
            "This proxy serves the Responses API over HTTP (POST with SSE), not WebSocket; "
            "it keeps the upstream WebSocket for you.",
            type="invalid_request_error",
            code="websocket_not_supported",
        )
        return error_response(error)

    async def websocket_responses() -> Response | None:
        await wsturns.serve(proxy, gate, "responses")
        return None

    async def websocket_codex() -> Response | None:
        await wsturns.serve(proxy, gate, "chatgpt")
        return None

    for path, route in (
        ("/v1/responses", websocket_responses),
        ("/responses", websocket_responses),
        ("/backend-api/codex/responses", websocket_codex),
    ):
        app.add_websocket(
            path,
            f"websocket{path}",
            route if settings.websocket_clients else refuse_upgrade,
        )

    async def relayed(route: access.Route, path: str, seconds: float) -> Response:
        """A request that is not a turn, relayed over HTTP (see trioproxy/relay.py)."""
        headers = keys.normalise(request.headers.items())
        query = request.query_string.decode()
        try:
            target, scope, body = await admitted(route, headers)
            if scope is not None:
                proxy.check_chain(chained_id(body), scope)
            reply = await relay(
                target,
                request.method,
                path + (f"?{query}" if query else ""),
                headers,
                body,
                await proxy.token(target),
                scope,
                seconds=seconds,
                max_bytes=settings.max_message_bytes,
            )
        except ApiError as exc:
            return error_response(exc)
        return Response(reply.body, status=reply.status, headers=dict(reply.headers))

    @app.get("/backend-api/codex/models")
    async def codex_models() -> Response:
        return await relayed("chatgpt", "/models", settings.connect_timeout)

    @app.get("/v1/models")
    async def api_models() -> Response:
        if gate.held is not None:
            return error_response(
                ApiError(
                    404,
                    "With a held ChatGPT login the model list is at /backend-api/codex/models.",
                    type="invalid_request_error",
                    code="not_found",
                )
            )
        return await relayed("responses", "/models", settings.connect_timeout)

    async def compact() -> Response:
        return await relayed("responses", "/responses/compact", settings.turn_timeout)

    async def codex_compact() -> Response:
        return await relayed("chatgpt", "/responses/compact", settings.turn_timeout)

    for path in ("/v1/responses/compact", "/responses/compact"):
        app.add_url_rule(path, f"compact{path}", compact, methods=["POST"])
    app.add_url_rule(
        "/backend-api/codex/responses/compact", "codex_compact", codex_compact, methods=["POST"]
    )

    @app.after_request
    async def tag(response: Response) -> Response:
        """Every answer names its request, so a client's report finds the turn's log line.

        An answer given before the request's body was read (a refusal from the headers alone:
        401, 400, 415, 404, 405) first reads the rest of a body within the size limit, so the
        client gets the answer rather than a reset while still sending, and the connection
        stays usable; a body over the limit, of unknown length or too slow closes the
        connection (`Connection: close`, and serving.py makes sure it closes)."""
        rid = g.get("request_id")
        if rid:
            response.headers["x-request-id"] = rid
        unread = _has_body(request.headers) and not g.get("body_read")
        if unread and (response.status_code in (408, 413) or not await _drained()):
            response.headers["Connection"] = "close"
        if response.status_code >= 400 and not g.get("turned"):
            _refused(response.status_code)
        return response

    def _refused(status: int) -> None:
        """A request answered with an error before any turn ran (a wrong key, a bad body, an
        unreachable upstream): one line, so an operator sees attacks and misconfigured
        clients. Never a header value or any content."""
        fields = {
            "request_id": g.get("request_id"),
            "status": status,
            "code": g.get("error_code"),
            "method": request.method,
            "path": request.path,
            "client_addr": request.remote_addr,
        }
        level = logging.WARNING if status in (401, 403) or status >= 500 else logging.INFO
        log.log(
            level,
            "refused %s %s: %d",
            request.method,
            request.path,
            status,
            extra={"fields": fields},
        )

    async def _drained() -> bool:
        """Read and drop the rest of the request's body, if it is within the limit: chunk by
        chunk (Quart's body iterator keeps no copy), so a refused request costs bandwidth,
        not memory, and no longer than `body_timeout`."""
        length = request.content_length
        if length is None or length > settings.max_body_bytes:
            return False
        with trio.move_on_after(settings.body_timeout):
            try:
                async for _ in request.body:
                    pass
            except Exception:  # too large after all, or the client left
                return False
            g.body_read = True
            return True
        return False

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        message = exc.description or exc.name
        if code == 413:  # name the limit and where it is set, not werkzeug's generic text
            message = (
                f"The request body is larger than this proxy accepts ({settings.max_body_bytes:,} "
                "bytes; TRIOPROXY_MAX_BODY_BYTES)."
            )
        return error_response(
            ApiError(
                code,
                message,
                type="invalid_request_error",
                code=exc.name.lower().replace(" ", "_"),
            )
        )

    return app
