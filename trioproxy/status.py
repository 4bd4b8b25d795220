"""The operator's routes: `/healthz` (JSON) and `/metrics` (Prometheus), behind the metrics key
when one is set."""

from __future__ import annotations

import hmac

from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request
from quart_trio import QuartTrio

from trioproxy import keys
from trioproxy.answers import error_response, json_response
from trioproxy.config import redacted_url
from trioproxy.context import AppContext
from trioproxy.errors import ApiError


def register(app: QuartTrio, ctx: AppContext) -> None:
    """The status routes and their key check."""

    @app.before_request
    async def guard_status_routes() -> Response | None:
        """`metrics_key` set: /healthz and /metrics answer only a client that presents it (the
        pool's size, tenants' turn counts and token totals are an operator's business)."""
        if not ctx.settings.metrics_key or request.path not in ("/healthz", "/metrics"):
            return None
        presented = keys.bearer(keys.normalise(request.headers.items()))
        if hmac.compare_digest(presented.encode(), ctx.settings.metrics_key.encode()):
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
                "upstream": redacted_url(ctx.settings.upstream_ws) if ctx.managed is None else None,
                "channels": {
                    name: redacted_url(target.url) for name, target in ctx.gate.channels.items()
                },
                "chatgpt_upstream": redacted_url(ctx.settings.chatgpt_ws),
                "held_login": ctx.login is not None,
                **ctx.registry.stats(),
                "turns": dict(ctx.proxy.turns),
                "placements": dict(ctx.proxy.placements),
                "retries": dict(ctx.proxy.retries),
                "request_bytes": ctx.proxy.request_bytes,
                "upstream_bytes": ctx.proxy.upstream_bytes,
                "upstream_wire_bytes": ctx.telemetry.wire_bytes,
                "suffix_saved_bytes": ctx.telemetry.saved_bytes,
                "input_tokens": ctx.telemetry.input_tokens,
                "cached_tokens": ctx.telemetry.cached_tokens,
                "token_refreshes": ctx.login.refreshes if ctx.login is not None else 0,
                "websocket_upgrades_refused": ctx.telemetry.refused_upgrades,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.telemetry.scrape(), content_type=CONTENT_TYPE_LATEST)
