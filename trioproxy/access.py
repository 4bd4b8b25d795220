"""Who may send a request, before anything goes upstream. Pure.

Pass-through routes carry the client's own upstream credential, so they need one to pass
through. A held login lends the proxy's ChatGPT login: when the proxy has a local key, only a
client presenting it may borrow the login (compared in constant time). With managed keys every
request must present a proxy key, which picks the scope and the channel.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Literal

from trioproxy.errors import ApiError
from trioproxy.keys import bearer
from trioproxy.managed import Managed
from trioproxy.targets import Target


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


Route = Literal["responses", "chatgpt"]


@dataclass(frozen=True, slots=True)
class Gate:
    """Which target serves a request on a route, and for which managed scope."""

    api: Target
    chatgpt: Target
    held: Target | None = None
    managed: Managed | None = None
    channels: dict[str, Target] = field(default_factory=dict)
    local_key: str = ""
    chatgpt_routes: bool = True  # serve /backend-api/codex/* in pass-through mode

    def resolve(self, headers: list[tuple[str, str]], route: Route) -> tuple[Target, str | None]:
        """(target, scope); raises the `ApiError` a refused request gets."""
        if self.managed is not None:
            if route == "chatgpt":
                raise ApiError(
                    404,
                    "ChatGPT-login routes are not served by a proxy with managed keys; "
                    "use /v1/responses with your proxy key.",
                    type="invalid_request_error",
                    code="not_found",
                )
            key, channel = self.managed.authenticate(headers)
            return self.channels[channel.name], key.scope
        if route == "chatgpt" and not self.chatgpt_routes:
            raise ApiError(
                404,
                "This proxy does not serve the ChatGPT-login routes (TRIOPROXY_CHATGPT_ROUTES "
                "is off); use /v1/responses.",
                type="invalid_request_error",
                code="not_found",
            )
        target = self.chatgpt if route == "chatgpt" else (self.held or self.api)
        refused = refusal(headers, target, self.local_key)
        if refused is not None:
            raise refused
        return target, None
