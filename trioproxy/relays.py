"""Routes that are not turns, relayed over HTTP with a turn's credentials and checks: the model
list and compaction (see relay.py for the call itself)."""

from __future__ import annotations

import orjson
from quart import Response, request
from quart_trio import QuartTrio

from trioproxy import access, keys
from trioproxy.answers import error_response
from trioproxy.context import AppContext
from trioproxy.delta import client_chained
from trioproxy.errors import ApiError
from trioproxy.relay import relay


def chained_id(body: bytes) -> str | None:
    """The `previous_response_id` a relayed body names (compaction carries one), if any."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None  # not ours to judge: the upstream refuses it
    return client_chained(parsed) if isinstance(parsed, dict) else None


def register(app: QuartTrio, ctx: AppContext) -> None:
    """The model list and compaction routes."""

    async def relayed(route: access.Route, path: str, seconds: float) -> Response:
        """A request that is not a turn, relayed over HTTP (see trioproxy/relay.py)."""
        headers = keys.normalise(request.headers.items())
        query = request.query_string.decode()
        try:
            target, scope, body = await ctx.admitted(route, headers)
            if scope is not None:
                ctx.proxy.check_chain(chained_id(body), scope)
            reply = await relay(
                target,
                request.method,
                path + (f"?{query}" if query else ""),
                headers,
                body,
                await ctx.proxy.token(target),
                scope,
                seconds=seconds,
                max_bytes=ctx.settings.max_message_bytes,
            )
        except ApiError as exc:
            return error_response(exc)
        return Response(reply.body, status=reply.status, headers=dict(reply.headers))

    @app.get("/backend-api/codex/models")
    async def codex_models() -> Response:
        return await relayed("chatgpt", "/models", ctx.settings.connect_timeout)

    @app.get("/v1/models")
    async def api_models() -> Response:
        if ctx.gate.held is not None:
            return error_response(
                ApiError(
                    404,
                    "With a held ChatGPT login the model list is at /backend-api/codex/models.",
                    type="invalid_request_error",
                    code="not_found",
                )
            )
        return await relayed("responses", "/models", ctx.settings.connect_timeout)

    async def compact() -> Response:
        return await relayed("responses", "/responses/compact", ctx.settings.turn_timeout)

    async def codex_compact() -> Response:
        return await relayed("chatgpt", "/responses/compact", ctx.settings.turn_timeout)

    for path in ("/v1/responses/compact", "/responses/compact"):
        app.add_url_rule(path, f"compact{path}", compact, methods=["POST"])
    app.add_url_rule(
        "/backend-api/codex/responses/compact", "codex_compact", codex_compact, methods=["POST"]
    )
