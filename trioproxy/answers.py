"""How the proxy answers over HTTP, whatever the surface: JSON, OpenAI-shaped errors, the
upstream's metadata headers. Shared by the turn, relay and status routes and the app's hooks.
"""

from __future__ import annotations

from typing import Any

import orjson
from quart import Response, g, has_request_context

from trioproxy.errors import ApiError


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def error_response(error: ApiError) -> Response:
    if has_request_context():
        g.error_code = error.code  # for the refusal's log line
    return json_response(error.body(), error.status)


def with_headers(response: Response, headers: list[tuple[str, str]]) -> Response:
    """The upstream's response metadata (metadata.py) added to the client's answer."""
    for name, value in headers:
        response.headers.add(name, value)
    return response


def has_body(headers: Any) -> bool:
    """Whether a request comes with a body (one the route may not have read)."""
    length = headers.get("content-length")
    return (length is not None and length.strip() not in ("", "0")) or (
        "chunked" in headers.get("transfer-encoding", "").lower()
    )
