"""Who may send a request, before anything goes upstream. Pure.

Pass-through routes carry the client's own upstream credential, so they need one to pass
through. A held login lends the proxy's ChatGPT login: when the proxy has a local key, only a
client presenting it may borrow the login (compared in constant time).
"""

from __future__ import annotations

import hmac

from trioproxy.errors import ApiError
from trioproxy.targets import Target


def bearer(headers: list[tuple[str, str]]) -> str:
    """The token of the `Authorization` header (lower-cased names), or ""."""
    for name, value in headers:
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else value.strip()
    return ""


def refusal(headers: list[tuple[str, str]], target: Target, local_key: str) -> ApiError | None:
    """The 401 for a request that may not use `target`, or None."""
    token = bearer(headers)
    if target.mode == "held":
        if local_key and not hmac.compare_digest(token.encode(), local_key.encode()):
            return ApiError(
                401,
                "Incorrect or missing proxy key: send 'Authorization: Bearer <key>' "
                "with the key this proxy was started with.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return None
    if not token:
        return ApiError(
            401,
            "Missing credentials: send the upstream API key as 'Authorization: Bearer <key>'.",
            type="invalid_request_error",
            code="missing_api_key",
        )
    return None
