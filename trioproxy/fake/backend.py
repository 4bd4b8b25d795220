"""The fake's ChatGPT side: logins it issued, the OAuth token endpoint, the model list. Pure.

Enough of the Codex backend (`chatgpt.com/backend-api/codex`) and of `auth.openai.com` for a
proxy to be tested against: bearer tokens are JWTs carrying `exp` and the ChatGPT account id,
refresh tokens rotate (a used one answers `refresh_token_reused`, as the real endpoint does),
and a token can be revoked to provoke the 401 that sends a client back to the token endpoint.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTH_CLAIMS = "https://api.openai.com/auth"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def make_jwt(claims: dict[str, Any]) -> str:
    """An unsigned JWT: clients read its claims, only the issuer checks signatures."""
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.fake-signature"


@dataclass(slots=True)
class Issued:
    account_id: str
    expires_at: float
    revoked: bool = False


@dataclass(slots=True)
class Logins:
    """Access and refresh tokens the fake issued, and what it was asked."""

    access: dict[str, Issued] = field(default_factory=dict)
    refresh: dict[str, str] = field(default_factory=dict)  # refresh token -> account id
    used_refresh: set[str] = field(default_factory=set)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def enforced(self) -> bool:
        """Once the fake has issued a login, only its own live tokens are accepted."""
        return bool(self.access)

    def issue(self, account_id: str, *, lifetime: float = 3600.0) -> dict[str, str]:
        """Fresh tokens for `account_id` (a negative lifetime issues an expired access token)."""
        n = next(self._serial)
        expires = time.time() + lifetime
        auth = {
            "chatgpt_account_id": account_id,
            "chatgpt_plan_type": "pro",
            "chatgpt_user_id": f"user-{account_id}",
        }
        access = make_jwt({"exp": int(expires), "n": n, AUTH_CLAIMS: auth})
        id_token = make_jwt(
            {"email": "dev@example.com", "exp": int(expires), "n": n, AUTH_CLAIMS: auth}
        )
        refresh = f"rt-{account_id}-{n}"
        self.access[access] = Issued(account_id, expires)
        self.refresh[refresh] = account_id
        return {
            "id_token": id_token,
            "access_token": access,
            "refresh_token": refresh,
            "account_id": account_id,
        }

    def auth_json(self, account_id: str, *, lifetime: float = 3600.0) -> dict[str, Any]:
        """A Codex `auth.json` holding a fresh login, as `codex login` writes it."""
        last = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "OPENAI_API_KEY": None,
            "tokens": self.issue(account_id, lifetime=lifetime),
            "last_refresh": last,
        }

    def revoke(self, access_token: str) -> None:
        self.access[access_token].revoked = True

    def check(self, authorization: str, account_header: str | None) -> tuple[int, str] | None:
        """None if the request may pass, else (status, error code)."""
        if not authorization.startswith("Bearer "):
            return 401, "missing_bearer"
        if not account_header:
            return 401, "missing_account_id"
        if not self.enforced:
            return None
        issued = self.access.get(authorization[len("Bearer ") :])
        if issued is None or issued.revoked:
            return 401, "invalid_token"
        if issued.expires_at <= time.time():
            return 401, "token_expired"
        if issued.account_id != account_header:
            return 403, "account_mismatch"
        return None

    def refresh_grant(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """The token endpoint: (status, JSON answer)."""
        try:
            request = json.loads(body)
        except ValueError:
            return 400, {"error": {"code": "invalid_request", "message": "body is not JSON"}}
        self.token_requests.append(request)
        if request.get("client_id") != CLIENT_ID or request.get("grant_type") != "refresh_token":
            return 400, {"error": {"code": "invalid_request", "message": "bad grant"}}
        token = request.get("refresh_token")
        if token in self.used_refresh:
            return 401, {"error": {"code": "refresh_token_reused", "message": "already used"}}
        account = self.refresh.pop(token, None) if isinstance(token, str) else None
        if account is None:
            return 401, {"error": {"code": "refresh_token_invalidated", "message": "unknown"}}
        self.used_refresh.add(token)
        tokens = self.issue(account)
        return 200, {
            "id_token": tokens["id_token"],
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
        }


def models_list() -> dict[str, Any]:
    """`GET /backend-api/codex/models`: no remote models, so Codex keeps its bundled list."""
    return {"models": []}


def api_models_list() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "trioproxy"}],
    }
