"""Settings: defaults, environment variables (`TRIOPROXY_*`) and command-line overrides."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

DEFAULT_UPSTREAM = "wss://api.openai.com/v1/responses"
CHATGPT_UPSTREAM = "wss://chatgpt.com/backend-api/codex/responses"
WEBSOCKET_BETA = "responses_websockets=2026-02-06"


def as_websocket(url: str) -> str:
    """A Responses WebSocket URL from what an operator may write: a `ws(s)://` URL as it is,
    an `http(s)://` API base (`https://api.openai.com/v1`) with its scheme swapped and
    `/responses` added (its query kept)."""
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(http):
            parts = urlsplit(ws + url[len(http) :])
            path = parts.path.rstrip("/")
            if not path.endswith("/responses"):
                path += "/responses"
            return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Query parameters whose value is a credential (`api-key`, `sig`, `access_token`, ...), matched
# in the lower-cased name; `code` (an OAuth grant) by name alone.
_SECRET_PARTS = ("key", "token", "secret", "sig", "pass", "auth")


def redacted_url(url: str) -> str:
    """`url` safe to print (start-up line, /healthz): credentials in its userinfo and in
    secret-named query parameters become `***`; everything else, `api-version` included,
    stays as written so the operator still recognises the upstream."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(_redacted_param(param) for param in parts.query.split("&"))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redacted_param(param: str) -> str:
    """One raw `name=value` of a query, its value hidden when the name says it is a secret."""
    name, eq, _ = param.partition("=")
    lowered = unquote_plus(name).lower()
    if eq and (lowered == "code" or any(part in lowered for part in _SECRET_PARTS)):
        return f"{name}=***"
    return param


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy can be told. Times are seconds."""

    upstream: str = DEFAULT_UPSTREAM
    host: str = "127.0.0.1"
    port: int = 8787
    # A socket idle this long is closed (upstream drops sockets at 60 min; stay well inside).
    idle_ttl: float = 50 * 60.0
    # A socket is never handed a turn it could not finish within this age.
    max_lifetime: float = 50 * 60.0
    # The longest a single turn may take; it also bounds how late a socket may start one.
    turn_timeout: float = 10 * 60.0
    # The longest the upstream may stay silent within a turn (Codex gives up at 300 s).
    read_timeout: float = 240.0
    connect_timeout: float = 15.0
    # How long a graceful close (idle eviction, shutdown) waits for the upstream's close frame.
    close_timeout: float = 2.0
    # Cap on pooled sockets (idle + busy); past it the least recently used idle one goes.
    max_sockets: int = 10_000
    max_body_bytes: int = 32 * 1024 * 1024
    # A request's body must arrive within this; past it the client gets 408 and the connection
    # is closed.
    body_timeout: float = 60.0
    # A client that has not accepted any of the answer's bytes for this long is disconnected
    # (`serve` only: it sets TCP_USER_TIMEOUT on its listening sockets).
    write_timeout: float = 120.0
    max_message_bytes: int = 64 * 1024 * 1024
    # Events buffered between the upstream socket and a client: bounded, so a slow client
    # slows its own socket instead of growing memory.
    event_buffer: int = 64
    # ... and bounded in bytes too: events of a megabyte each would otherwise be 64 MB.
    event_buffer_bytes: int = 4 * 1024 * 1024
    beta: str = WEBSOCKET_BETA
    # Offer permessage-deflate upstream (used when the upstream accepts): continuation turns
    # repeat `tools` and `instructions`, which compress to back-references into the last turn.
    permessage_deflate: bool = True
    # An idle socket keeps its compression context (~200 KiB) this long, then frees it.
    deflate_hold: float = 60.0
    # Let the upstream compress events against earlier ones. Reading them then needs its
    # context kept for the socket's life (~40-50 KiB idle), so by default the offer asks for
    # server_no_context_takeover: events are small, and requests are what repeat.
    deflate_events_context: bool = False
    shutdown_grace: float = 5.0
    # HTTP fallback: when the upstream refuses the upgrade, or a session's sockets fail this
    # many times in a row, its turns go over HTTP POST /responses for the cool-down.
    http_fallback: bool = True
    fallback_after: int = 3
    fallback_cooldown: float = 300.0
    # The Codex backend, for ChatGPT logins (its HTTP base serves `/models`).
    chatgpt_upstream: str = CHATGPT_UPSTREAM
    # Serve the ChatGPT-login routes (/backend-api/codex/*) in pass-through mode: any client
    # with a ChatGPT bearer may then use this proxy to reach the Codex backend.
    chatgpt_routes: bool = True
    # Serve clients that open a WebSocket themselves (Codex with supports_websockets, the SDK's
    # responses.connect()); off, their upgrade gets 426 and Codex falls back to HTTP.
    websocket_clients: bool = True
    # A client WebSocket that sends nothing for this long is closed (1000); its upstream socket
    # stays pooled for the session, so a reconnect continues the chain.
    websocket_idle_timeout: float = 50 * 60.0
    # Managed mode: a client's `previous_response_id` this instance did not see its scope make
    # (made on another instance behind a balancer, or before a restart) is refused as not
    # found: fail closed, so no scope can chain from another's id it learnt. Off, such an id
    # goes to the upstream, which judges it by its own rules (the API key's, not the scope's).
    refuse_unseen_chains: bool = True
    # Idle seconds before the server closes a client's keep-alive connection: above a
    # balancer's own idle timeout to us (nginx keepalive_timeout, HAProxy timeout http-keep-alive).
    keep_alive_timeout: float = 75.0
    # Allocations between young-generation garbage collections (0: Python's 700). Each relayed
    # event allocates a few containers, so at 700 the collector ran about once per 30 events and
    # took 15-20 us of each event's CPU; at 5,000 it took 2-6 us, with no loss at one session
    # (bench/README.md, "Hot path"). Start-up's objects are also frozen out of collection.
    gc_gen0: int = 5000
    # Lanes: sessions share upstream sockets, each on a named lane (`stream_id`) of its own,
    # per credential, scope and upstream (lanes.py). Off until tried against the live API.
    lanes: bool = False
    # Named lanes a shared socket gives sessions (the protocol accepts 32 per connection).
    lanes_per_socket: int = 32
    # A key /healthz and /metrics require ("" = open to anyone who can reach the port, as for
    # a proxy on loopback or a private network a balancer and a scraper share).
    metrics_key: str = ""
    # Proxy-held ChatGPT login: path of a Codex `auth.json` ("" = off).
    codex_auth: str = ""
    # Token endpoint for refreshing it ("" = Codex's, or $CODEX_REFRESH_TOKEN_URL_OVERRIDE).
    codex_token_url: str = ""
    # Sent upstream with a held login when the client sends no `originator` (Codex's own).
    codex_originator: str = "codex_cli_rs"
    # Key clients must present (`Authorization: Bearer <key>`) to use a held login.
    api_key: str = ""

    def __post_init__(self) -> None:
        if self.turn_timeout >= self.max_lifetime:
            raise ValueError("turn_timeout must be shorter than max_lifetime")
        for name in (
            "idle_ttl",
            "max_lifetime",
            "turn_timeout",
            "read_timeout",
            "connect_timeout",
            "body_timeout",
            "websocket_idle_timeout",
            "event_buffer_bytes",
            "max_body_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.write_timeout < 0:
            raise ValueError("write_timeout must be 0 (the kernel's) or positive")
        if self.deflate_hold < 0:
            raise ValueError("deflate_hold must be >= 0")
        if self.fallback_after < 1 or self.fallback_cooldown < 0:
            raise ValueError("fallback_after must be at least 1 and fallback_cooldown >= 0")
        if not 1 <= self.lanes_per_socket <= 32:
            raise ValueError("lanes_per_socket must be 1-32 (the protocol's named lanes)")
        if self.max_sockets < 1 or self.event_buffer < 1:
            raise ValueError("max_sockets and event_buffer must be at least 1")
        for name in ("upstream", "chatgpt_upstream"):
            url = getattr(self, name)
            if url.split("://", 1)[0] not in ("ws", "wss", "http", "https"):
                shown = redacted_url(url)
                raise ValueError(
                    f"{name} must be a ws://, wss://, http:// or https:// URL: {shown}"
                )
        if self.codex_auth and not self.api_key and not is_loopback(self.host):
            raise ValueError(
                f"--codex-auth on {self.host} would lend your ChatGPT login to anyone who can "
                "reach it: listen on 127.0.0.1, or set a key clients must send "
                "(--api-key / TRIOPROXY_API_KEY)"
            )

    @property
    def upstream_ws(self) -> str:
        """The upstream as a WebSocket URL (an http(s) base is accepted for convenience)."""
        return as_websocket(self.upstream)

    @property
    def chatgpt_ws(self) -> str:
        return as_websocket(self.chatgpt_upstream)

    @property
    def usable_lifetime(self) -> float:
        """Age after which a socket can no longer take a turn it is sure to finish."""
        return self.max_lifetime - self.turn_timeout

    @property
    def rotation_window(self) -> float:
        """The last stretch of a shared socket's usable life: it takes no new sessions, and
        its sessions move off one by one, spread over the window (lanes.py)."""
        return self.usable_lifetime / 4

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, base: Mapping[str, Any] | None = None
    ) -> Settings:
        """`base` (a config file's [server] table), then `TRIOPROXY_<FIELD>` over it:
        `TRIOPROXY_UPSTREAM`, `TRIOPROXY_IDLE_TTL`..."""
        env = os.environ if env is None else env
        defaults = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            kind = type(getattr(defaults, f.name))
            if base is not None and f.name in base:
                values[f.name] = _typed(f.name, base[f.name], kind)
            raw = env.get(f"TRIOPROXY_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(
                    f"TRIOPROXY_{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from None
        return cls(**values)


def _typed(name: str, value: Any, kind: type) -> Any:
    """A config-file value of the field's type (an int is a fine float)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ValueError(f"[server] {name} = {value!r} is not a {kind.__name__}")
    return value


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
