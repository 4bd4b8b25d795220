"""OpenAI-style errors, and how upstream failures map onto them. Pure: no I/O.

One value type, `ApiError`, travels from wherever a failure is found to the HTTP layer, which
renders it as `{"error": {...}}` with a status when nothing has been streamed yet, or as the flat
SSE `error` event once the stream has begun (the two shapes clients parse, DESIGN.md section 2).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# Codes whose upstream `error` event may arrive without a `status`; the rest default by type.
_STATUS_BY_CODE = {
    "previous_response_not_found": 400,
    "context_length_exceeded": 400,
    "invalid_stream_id": 400,
    "model_mismatch": 400,
    "response_already_in_flight": 409,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "websocket_connection_limit_reached": 429,
    "websocket_stream_limit_reached": 429,
}
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "server_error": 500,
}


# Credentials an upstream may quote back: API keys (`sk-`, `sk-proj-`, restricted `rk-`, even
# masked as OpenAI masks them, `sk-proj-abc***wxyz`), session keys (`sess-`), bearer tokens. A
# trailing full stop ends the sentence, not the key.
_KEY_LIKE = re.compile(r"(?<![A-Za-z0-9])(sk|rk|sess)-[A-Za-z0-9_\-*.]{3,}[A-Za-z0-9_\-*]")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9_\-.~+/=*]{8,}")


def redact(text: str) -> str:
    """`text` with key-like tokens replaced (`sk-***`): an upstream's 401 quotes the key it got,
    and for a managed client that is the channel's key, not one the client knows."""
    return _BEARER.sub(r"\1 ***", _KEY_LIKE.sub(r"\1-***", text))


class ApiError(Exception):
    """A failure a client must see, with everything needed to render it either way."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code or self.type}: {self.message!r})"

    def body(self) -> dict[str, Any]:
        """The JSON body of an HTTP error response."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def sse_event(self, sequence_number: int) -> dict[str, Any]:
        """The flat `error` event for a stream that has already begun."""
        return {
            "type": "error",
            "code": self.code or self.type,
            "message": self.message,
            "param": self.param,
            "sequence_number": sequence_number,
        }

    def failed_event(self, response: dict[str, Any], sequence_number: int) -> dict[str, Any]:
        """`response.failed` for a response the client saw created, carrying this error.

        Codex's SSE reader skips `error` events and takes a failure's code only from
        `response.failed` (`context_length_exceeded`, `insufficient_quota`, a rate limit's
        "try again in Ns"), so a stream that began ends with both.
        """
        failed = {
            **response,
            "status": "failed",
            "error": {"code": self.code or self.type, "message": self.message},
        }
        return {"type": "response.failed", "response": failed, "sequence_number": sequence_number}


def from_error_event(data: dict[str, Any]) -> ApiError:
    """Map an upstream `error` event, nested (WebSocket) or flat (SSE), to an `ApiError`."""
    inner = data.get("error")
    fields: dict[str, Any] = inner if isinstance(inner, dict) else data
    code = _str_or_none(fields.get("code"))
    type_ = _str_or_none(fields.get("type"))
    if type_ in (None, "error"):
        type_ = "invalid_request_error" if code in _STATUS_BY_CODE else "server_error"
    status = data.get("status")
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = _STATUS_BY_CODE.get(code or "", _STATUS_BY_TYPE.get(type_, 500))
    status = relayed_status(status)
    message = redact(_str_or_none(fields.get("message")) or "upstream reported an error")
    return ApiError(status, message, type=type_, param=_str_or_none(fields.get("param")), code=code)


def relayed_status(status: int) -> int:
    """The HTTP status for an upstream's error: its own, except that the upstream's 503
    becomes 502. A 503 from this proxy means only "draining": a balancer in front takes the
    instance out of rotation for it (docs/deploy.md), which the provider's trouble must not do."""
    return 502 if status == 503 else status


def from_handshake_rejection(status: int, body: bytes | None) -> ApiError:
    """Map a refused WebSocket upgrade; an OpenAI error body is kept, anything else summarised."""
    parsed: Any = None
    if body:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = from_error_event({"status": status, "error": parsed["error"]})
        err.status = relayed_status(status) if 400 <= status <= 599 else 502
        return err
    return _upstream(
        relayed_status(status) if 400 <= status <= 599 else 502,
        "upstream_handshake_rejected",
        f"upstream refused the WebSocket handshake with HTTP {status}",
    )


def _upstream(status: int, code: str, message: str) -> ApiError:
    """An error of the proxy's own about the upstream; its detail may quote upstream text."""
    return ApiError(status, redact(message), type="upstream_error", code=code)


def too_many_messages(kind: object) -> ApiError:
    """A WebSocket client's message refused (wsturns.py)."""
    return ApiError(
        429,
        f"Too many messages in flight on this connection; send `{kind}` again later.",
        type="invalid_request_error",
        code="too_many_messages",
    )


def response_in_progress(kind: object) -> ApiError:
    """A WebSocket client's message refused (wsturns.py)."""
    return ApiError(
        409,
        f"`{kind}` is relayed only while no response of this client runs or waits on the "
        "default lane (the upstream answers it there); send it again after that response ends.",
        type="invalid_request_error",
        code="response_in_progress",
    )


def unsupported_event(kind: object) -> ApiError:
    """A WebSocket client's message refused (wsturns.py)."""
    return ApiError(
        400,
        f"`{kind}` is not relayed in managed mode: only `response.create` and "
        "`response.steer` are.",
        type="invalid_request_error",
        code="unsupported_event",
    )


def proxy_loop() -> ApiError:
    return ApiError(
        508,
        "This request already went through this proxy: its upstream leads back to it. "
        "Point the upstream (TRIOPROXY_UPSTREAM, a channel's upstream) at the provider.",
        type="server_error",
        code="proxy_loop",
    )


def upstream_unreachable(detail: str) -> ApiError:
    return _upstream(
        502, "upstream_unreachable", f"could not open the upstream WebSocket: {detail}"
    )


def upstream_closed(detail: str) -> ApiError:
    return _upstream(
        502,
        "upstream_connection_closed",
        f"the upstream WebSocket closed before the response finished: {detail}",
    )


def upstream_message_too_large(detail: str) -> ApiError:
    """The upstream closed the socket with 1009 after our message: it takes no message that
    large, so the request cannot succeed as it is, on any socket (not retried)."""
    return _upstream(
        413,
        "upstream_message_too_large",
        f"the request is larger than the upstream takes in one WebSocket message: {detail}",
    )


def upstream_protocol(detail: str) -> ApiError:
    return _upstream(502, "bad_event", f"upstream sent an unreadable event: {detail}")


def lanes_ignored() -> ApiError:
    """A shared socket's response came on the default lane: the upstream ignores `stream_id`."""
    return _upstream(
        502, "upstream_ignores_lanes", "the upstream answered a lane's request on the default lane"
    )


def turn_timeout(seconds: float) -> ApiError:
    return _upstream(
        504, "upstream_timeout", f"the upstream response did not finish within {seconds:g} s"
    )


def previous_response_not_found(response_id: str) -> ApiError:
    return ApiError(
        400,
        f"Previous response with id '{response_id}' not found.",
        type="invalid_request_error",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def client_too_slow(limit: int) -> ApiError:
    """A client on a shared upstream socket fell too far behind: waiting for it would stall
    every other session on that socket, so its turn ends instead."""
    return _upstream(
        504,
        "client_too_slow",
        f"the client read too slowly: its backlog of events reached its bound ({limit} bytes "
        "or 4096 events) on an upstream socket shared with other sessions",
    )


def upstream_silent(seconds: float) -> ApiError:
    return _upstream(504, "upstream_timeout", f"the upstream sent nothing for {seconds:g} s")


def login_failed(detail: str) -> ApiError:
    """The proxy's own ChatGPT login cannot be used: the operator, not the client, must act."""
    return _upstream(502, "upstream_login_failed", f"the proxy's ChatGPT login failed: {detail}")


def shutting_down() -> ApiError:
    return ApiError(
        503,
        "The proxy is shutting down: retry on another instance or in a moment.",
        type="server_error",
        code="shutting_down",
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
