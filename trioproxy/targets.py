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
from urllib.parse import urlsplit, urlunsplit

from trioproxy import keys
from trioproxy.codex_auth import CodexLogin
from trioproxy.config import Settings, as_websocket
from trioproxy.managed import CHANNEL_HEADER, Channel, Managed

Mode = Literal["api", "chatgpt", "held", "managed"]
Headers = list[tuple[str, str]]
ACCOUNT_HEADER = "chatgpt-account-id"


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str
    headers: list[tuple[str, str]]  # the upstream handshake's
    key: str | None  # the session's pool key; None: the request names no session
    group: str  # who may share a socket: upstream, credential, meaningful headers
    token: str | None = None  # the held login's token used, to refresh after a 401
    session: str | None = None  # how the request named its session: "header", "cache_key"


@dataclass(frozen=True, slots=True)
class Target:
    """A route's upstream: its WebSocket URL and how turns authenticate there.

    Pass-through modes (`api`, `chatgpt`) forward the client's credential. The others replace
    it: `held` with the proxy's ChatGPT login, `managed` with a channel's key; what replaced it
    (account, login, scope, channel) enters the pool key instead of the secret.
    """

    mode: Mode
    url: str
    beta: str
    login: CodexLogin | None = None
    originator: str = "codex_cli_rs"
    channel: Channel | None = None

    @property
    def chatgpt(self) -> bool:
        """The Codex backend: it keeps nothing, so `store` must be false."""
        return self.mode in ("chatgpt", "held")

    def upstream(
        self,
        client_headers: list[tuple[str, str]],
        token: str | None,
        scope: str | None = None,
        cache_key: object = None,
    ) -> Upstream:
        """The upstream for a request with these (lower-cased) headers and, when it sends no
        session header, this `prompt_cache_key` as its session."""
        session = keys.affinity(client_headers, cache_key)
        kind = session[0] if session is not None else None
        # The proxy's own marks (scope, channel, login, mode) key the pool; a client's
        # `x-trioproxy-*` never do, so no request can dress as another mode's socket.
        marks: list[tuple[str, str]] = [("x-trioproxy-mode", self.mode)]
        if self.mode in ("api", "chatgpt"):
            sent, identity = keys.forwarded(client_headers, self.beta), client_headers
        else:
            own, credentials, substituted = self._substitute(client_headers, token, scope)
            sent, identity = keys.forwarded([*own, *credentials], self.beta), [*own, *substituted]
            marks += [(n, v) for n, v in substituted if n.startswith("x-trioproxy-")]
        identity = [(n, v) for n, v in identity if not n.startswith("x-trioproxy-")] + marks
        return Upstream(
            self.url,
            sent,
            keys.pool_key(self.url, identity, self.beta, session) if session else None,
            keys.group_key(self.url, identity, self.beta),
            token,
            kind,
        )

    def http_headers(
        self, client_headers: list[tuple[str, str]], token: str | None, scope: str | None = None
    ) -> list[tuple[str, str]]:
        """Headers for a plain HTTP call relayed to this target (no WebSocket beta flag)."""
        if self.mode in ("api", "chatgpt"):
            return keys.relayed(client_headers)
        own, credentials, _ = self._substitute(client_headers, token, scope)
        return keys.relayed([*own, *credentials])

    def _substitute(
        self, client_headers: list[tuple[str, str]], token: str | None, scope: str | None
    ) -> tuple[Headers, Headers, Headers]:
        """(the client's own headers, the credentials sent instead, what identifies them)."""
        if self.mode == "held":
            assert self.login is not None and token is not None
            own = [(n, v) for n, v in client_headers if n not in ("authorization", ACCOUNT_HEADER)]
            if not any(name == "originator" for name, _ in own):
                own.append(("originator", self.originator))
            account = (ACCOUNT_HEADER, self.login.account_id)
            login = ("x-trioproxy-login", str(self.login.path))
            return own, [("authorization", f"Bearer {token}"), account], [account, login]
        assert self.channel is not None and scope is not None
        fixed = list(self.channel.headers)
        own = keys.managed_own(client_headers, (name for name, _ in fixed))
        bearer = ("authorization", f"Bearer {self.channel.secret}")
        identity = [*fixed, ("x-trioproxy-scope", scope), (CHANNEL_HEADER, self.channel.name)]
        return own, [*fixed, bearer], identity


_HTTP_SCHEMES = {"wss": "https", "ws": "http"}


def http_base(ws_url: str) -> str:
    """The HTTP base of a Responses WebSocket URL: `wss://h/p/responses` -> `https://h/p`.

    The upstream's query (Azure's `?api-version=`) is kept, so never append a path to this:
    build a URL under the base with `http_url`.
    """
    return http_url(ws_url, "")


def http_url(ws_url: str, path: str, query: str = "") -> str:
    """The HTTP URL of `path` under a Responses WebSocket URL's base, parsed rather than
    concatenated so the upstream's own query (Azure's `?api-version=`) stays a query; a
    request's `query` is merged after it."""
    parts = urlsplit(ws_url)
    base = parts.path.rstrip("/")
    if base.endswith("/responses"):
        base = base[: -len("/responses")]
    merged = "&".join(q for q in (parts.query, query.lstrip("?")) if q)
    scheme = _HTTP_SCHEMES.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, base + path, merged, ""))


def api_target(settings: Settings) -> Target:
    """API-key pass-through to the configured upstream."""
    return Target("api", settings.upstream_ws, settings.beta)


def managed_targets(settings: Settings, managed: Managed) -> dict[str, Target]:
    """One target per channel of a managed config."""
    return {
        name: Target("managed", as_websocket(channel.upstream), settings.beta, channel=channel)
        for name, channel in managed.channels.items()
    }


def chatgpt_target(settings: Settings, login: CodexLogin | None = None) -> Target:
    """The Codex backend: with the client's ChatGPT login, or with the proxy's own."""
    if login is None:
        return Target("chatgpt", settings.chatgpt_ws, settings.beta)
    return Target("held", settings.chatgpt_ws, settings.beta, login, settings.codex_originator)
