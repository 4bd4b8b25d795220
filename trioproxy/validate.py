"""Request validation: refuse bad input with a precise 400 before anything goes upstream. Pure.

Only what the proxy relies on is checked here; the model provider validates the rest.
"""

from __future__ import annotations

import re
from typing import Any

from trioproxy import bigjson, keys
from trioproxy.errors import ApiError
from trioproxy.keys import SESSION_HEADERS

_CREDENTIALS = frozenset({"authorization", "chatgpt-account-id"})


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


def parse_request(raw: bytes) -> dict[str, Any]:
    """Parse and check a `POST /v1/responses` body."""
    if not raw.strip():
        raise _invalid(None, "The request body is empty; expected a JSON object.", "invalid_json")
    try:
        body = bigjson.loads(raw)
    except ValueError as exc:
        raise _invalid(None, f"The request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid(
            None,
            f"The request body must be a JSON object, not {type(body).__name__}.",
            "invalid_type",
        )
    if "stream_id" in body:
        # A WebSocket lane; over HTTP the API does not know it, and with lanes on the proxy
        # names the lanes itself.
        raise _invalid(
            "stream_id",
            "Unrecognized request argument supplied: stream_id (a WebSocket-mode field).",
            "unknown_parameter",
        )
    return check_body(body)


def check_body(body: dict[str, Any]) -> dict[str, Any]:
    """The checks on a parsed request (an HTTP body, a WebSocket `response.create`)."""
    model = body.get("model")
    if model is None:
        raise _invalid(
            "model", "Missing required parameter: 'model'.", "missing_required_parameter"
        )
    if not isinstance(model, str) or not model:
        raise _invalid(
            "model", "Invalid type for 'model': expected a non-empty string.", "invalid_type"
        )
    if "input" in body:
        value = body["input"]
        if not isinstance(value, str | list):
            raise _invalid(
                "input", "Invalid type for 'input': expected a string or an array.", "invalid_type"
            )
        if isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise _invalid(
                        f"input[{index}]",
                        f"Invalid type for 'input[{index}]': expected an object.",
                        "invalid_type",
                    )
    elif not isinstance(body.get("previous_response_id"), str) and "prompt" not in body:
        raise _invalid(
            "input", "Missing required parameter: 'input'.", "missing_required_parameter"
        )
    for name, kinds, label in (
        ("stream", bool, "a boolean"),
        ("background", bool, "a boolean"),
        ("store", bool, "a boolean"),
        ("previous_response_id", str, "a string"),
        ("tools", list, "an array"),
        ("instructions", str, "a string"),
    ):
        if body.get(name) is not None and not isinstance(body[name], kinds):
            raise _invalid(name, f"Invalid type for '{name}': expected {label}.", "invalid_type")
    if body.get("background") is True:
        raise _invalid(
            "background",
            "Background responses are not supported through the WebSocket proxy.",
            "unsupported_parameter",
        )
    return body


def require_unstored(body: dict[str, Any]) -> dict[str, Any]:
    """The Codex backend stores nothing: `store` must be false; absent means false."""
    if body.get("store", False) is not False:
        raise _invalid(
            "store",
            "The ChatGPT Codex backend does not store responses: 'store' must be false "
            "(or left out) on this route.",
            "unsupported_parameter",
        )
    return {**body, "store": False}


_SESSION_ID = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII: ids, UUIDs, affinity tokens


def check_headers(headers: list[tuple[str, str]]) -> None:
    """Refuse what the proxy cannot use before the body is read: a body that is not JSON (415)
    and a session id that is not a short printable token (it becomes part of a pool key)."""
    for name, value in headers:
        if name == "content-type":
            media = value.split(";", 1)[0].strip().lower()
            if media and media != "application/json" and not media.endswith("+json"):
                raise ApiError(
                    415,
                    f"Unsupported Content-Type {media!r}: send the body as application/json.",
                    type="invalid_request_error",
                    code="unsupported_media_type",
                )
        elif name in _CREDENTIALS and not keys.sendable([(name, value)]):
            # Dropped on the way upstream, it would leave the request without a credential
            # that still passed as one here: refuse it instead.
            raise ApiError(
                401,
                f"The '{name}' header holds characters that cannot be sent upstream.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        elif name in SESSION_HEADERS and not _SESSION_ID.fullmatch(value):
            raise _invalid(
                None,
                f"Invalid '{name}' header: expected 1 to 256 visible ASCII characters.",
                "invalid_session_id",
            )
