"""Where a route's turns go upstream, and with whose credentials.

Three ways in, one shape out (`Upstream`: URL, handshake headers, pool key):

- API-key pass-through (`/v1/responses`): the client's bearer goes to the configured upstream.
- ChatGPT-login pass-through (`/backend-api/codex/responses`): Codex logged in with ChatGPT sends
  its bearer and `chatgpt-account-id`; both go to the Codex backend as Codex would send them.
- Proxy-held login (`/v1/responses` under `serve --codex-auth`): the client authenticated to the
  proxy; the proxy's own ChatGPT token and account id go upstream instead.

The pool key never holds a secret: it hashes the upstream, the session and the headers that change
upstream meaning. For a held login it hashes the account, not the token, so a token refresh does
not orphan the session's socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trioproxy import keys
from trioproxy.codex_auth import CodexLogin
from trioproxy.config import Settings

Mode = Literal["api", "chatgpt", "held"]
ACCOUNT_HEADER = "chatgpt-account-id"


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    headers: list[tuple[str, str]]  # the upstream handshake's
    key: str | None  # pool key; None: a one-turn socket
    token: str | None = None  # the held login's token used, to refresh after a 401


@dataclass(frozen=True, slots=True)
class Target:
    """A route's upstream: its WebSocket URL and how turns authenticate there."""

    mode: Mode
    url: str
    beta: str
    login: CodexLogin | None = None
    originator: str = "codex_cli_rs"

    @property
    def chatgpt(self) -> bool:
        """The Codex backend: it keeps nothing, so `store` must be false."""
        return self.mode != "api"

    def upstream(self, client_headers: list[tuple[str, str]], token: str | None) -> Upstream:
        """The upstream for a request with these (lower-cased) headers."""
        if self.mode != "held":
            return Upstream(
                self.url,
                keys.forwarded(client_headers, self.beta),
                keys.pool_key(self.url, client_headers, self.beta),
            )
        assert self.login is not None and token is not None
        own = self._own(client_headers)
        account = self._account()
        key_headers = [*own, account, ("x-trioproxy-login", str(self.login.path))]
        return Upstream(
            self.url,
            keys.forwarded([*own, ("authorization", f"Bearer {token}"), account], self.beta),
            keys.pool_key(self.url, key_headers, self.beta),
            token,
        )

    def http_headers(
        self, client_headers: list[tuple[str, str]], token: str | None
    ) -> list[tuple[str, str]]:
        """Headers for a plain HTTP call relayed to this target (no WebSocket beta flag)."""
        if self.mode != "held":
            return keys.relayed(client_headers)
        assert self.login is not None and token is not None
        own = self._own(client_headers)
        credentials = [
            ("authorization", f"Bearer {token}"),
            (ACCOUNT_HEADER, self.login.account_id),
        ]
        return keys.relayed([*own, *credentials])

    def _account(self) -> tuple[str, str]:
        assert self.login is not None
        return (ACCOUNT_HEADER, self.login.account_id)

    def _own(self, client_headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """A held-login client's headers without its proxy key, plus Codex's originator."""
        own = [(n, v) for n, v in client_headers if n not in ("authorization", ACCOUNT_HEADER)]
        if not any(name == "originator" for name, _ in own):
            own.append(("originator", self.originator))
        return own


def http_base(ws_url: str) -> str:
    """The HTTP base of a Responses WebSocket URL: `wss://h/p/responses` -> `https://h/p`."""
    url = ws_url.rstrip("/")
    if url.endswith("/responses"):
        url = url[: -len("/responses")]
    for ws, http in (("wss://", "https://"), ("ws://", "http://")):
        if url.startswith(ws):
            return http + url[len(ws) :]
    return url


def api_target(settings: Settings) -> Target:
    """API-key pass-through to the configured upstream."""
    return Target("api", settings.upstream_ws, settings.beta)


def chatgpt_target(settings: Settings, login: CodexLogin | None = None) -> Target:
    """The Codex backend: with the client's ChatGPT login, or with the proxy's own."""
    if login is None:
        return Target("chatgpt", settings.chatgpt_ws, settings.beta)
    return Target("held", settings.chatgpt_ws, settings.beta, login, settings.codex_originator)
