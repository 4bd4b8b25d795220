"""The app: Quart-trio under hypercorn, its lifecycle, and what every answer goes through.

Each surface registers its own routes (http_turns.py, wsturns.py, relays.py, status.py) on one
shared context (context.py). Here: the registry task starts and stops with the server, a
draining server refuses new work, and every answer is tagged with its request id, drains or
closes an unread body, and logs a refusal.
"""

from __future__ import annotations

import logging

import trio
from quart import Response, g, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioproxy import access, errors, http_turns, keys, relays, status, wsturns
from trioproxy.answers import error_response, has_body
from trioproxy.codex_auth import held_login
from trioproxy.config import Settings
from trioproxy.connector import Connector, websocket_connector
from trioproxy.context import AppContext
from trioproxy.errors import ApiError
from trioproxy.managed import Managed
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry
from trioproxy.serving import WholeAnswers
from trioproxy.targets import api_target, chatgpt_target, managed_targets
from trioproxy.telemetry import Telemetry

log = logging.getLogger("trioproxy.app")


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
    ctx = AppContext(settings, proxy, registry, telemetry, gate, login, managed)
    for surface in (http_turns, wsturns, relays, status):
        surface.register(app, ctx)

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
    async def refuse_loops() -> Response | None:
        """A request this proxy already sent upstream (its upstream leads back to it): 508
        at once, instead of one more upstream socket per hop until everything times out."""
        if keys.looped(keys.normalise(request.headers.items())):
            return error_response(errors.proxy_loop())
        return None

    @app.before_websocket
    async def refuse_websocket_loops() -> Response | None:
        if keys.looped(keys.normalise(websocket.headers.items())):
            return error_response(errors.proxy_loop())
        return None

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
        unread = has_body(request.headers) and not g.get("body_read")
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
