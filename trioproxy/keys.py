"""Which headers go upstream, which session a request belongs to, and its pool key. Pure.

A pooled socket may be reused only by a request that would have opened the very same socket:
same upstream, same session, same credential, same headers that change what the upstream does.
The key is a hash of all of that, so neither secrets nor raw header values sit in the pool.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from hashlib import sha256

SESSION_HEADERS = (
    "session-id",
    "session_id",
    "x-session-id",
    "x-session-affinity",
    "x-conversation-id",
    "x-thread-id",
)
# Per conversation, not per credential: Codex (0.16x) sends its conversation's id as
# `thread-id` beside `session-id` (the same value). Hashed into a session's pool key, never
# into its credential group (sessions of one key may share a socket, lanes.py), and no session
# header of its own.
_CONVERSATION_HEADERS = frozenset({"thread-id"})

# Never forwarded: hop-by-hop, body framing, the WebSocket handshake's own, and cookies.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "content-encoding",
        "accept",
        "accept-encoding",
        "expect",
        "cookie",
        "remote-addr",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        # The hop between the client and this proxy: not the upstream's business.
        "forwarded",
        "via",
        "x-real-ip",
        "origin",
        "referer",
    }
)
_NOT_FORWARDED_PREFIXES = ("x-forwarded-", "x-trioproxy-")

# Forwarded but per request: tracing and client telemetry that must not split the pool.
_PER_REQUEST = frozenset(
    {
        "traceparent",
        "tracestate",
        "baggage",
        "x-request-id",
        "x-client-request-id",
        "x-codex-turn-metadata",
        "x-codex-window-id",
        # Echoed by Codex from the previous answer: changes every turn.
        "x-codex-turn-state",
    }
)
_PER_REQUEST_PREFIXES = ("x-stainless-", "x-datadog-", "x-b3-", "x-amzn-trace")

BETA_HEADER = "openai-beta"

# Managed mode: the channel decides everything that changes billing or data access
# (`openai-organization`, `openai-project`, `chatgpt-account-id`, ...); of the client's own
# headers only these go upstream: session, client identity, tracing, Codex's turn metadata.
_MANAGED_ALLOWED = frozenset(
    {
        *SESSION_HEADERS,
        *_CONVERSATION_HEADERS,
        "user-agent",
        "originator",
        "version",
        "openai-beta",
        "x-client-request-id",
        "x-request-id",
        "traceparent",
        "tracestate",
        "baggage",
        "accept-language",
    }
)
_MANAGED_ALLOWED_PREFIXES = ("x-codex-", "x-stainless-", "x-openai-internal-codex-")


def managed_own(headers: list[tuple[str, str]], pinned: Iterable[str]) -> list[tuple[str, str]]:
    """The client headers a managed channel lets through: the allow-list, less every header
    the channel pins itself (never sent twice)."""
    fixed = {name.lower() for name in pinned}
    return [
        (name, value)
        for name, value in headers
        if (name in _MANAGED_ALLOWED or name.startswith(_MANAGED_ALLOWED_PREFIXES))
        and name not in fixed
    ]


def normalise(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in headers]


def session_id(headers: list[tuple[str, str]]) -> str | None:
    """The first session header present, in the documented order (Codex sends `session-id`);
    of two headers of the same name, the first."""
    found: dict[str, str] = {}
    for name, value in headers:
        if name in SESSION_HEADERS and value:
            found.setdefault(name, value)
    for name in SESSION_HEADERS:
        if name in found:
            return found[name]
    return None


# An HTTP field value as h11 will send it: visible characters, inner spaces and tabs only.
_FIELD_VALUE = re.compile(r"[\x21-\x7e\x80-\xff]([\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?")


def sendable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Values trimmed; a header whose value cannot go on the wire (empty, control characters)
    is dropped rather than failing the whole upstream request."""
    out = []
    for name, value in headers:
        value = value.strip(" \t")
        if _FIELD_VALUE.fullmatch(value):
            out.append((name, value))
    return out


def _forwardable(name: str) -> bool:
    return name not in _NOT_FORWARDED and not name.startswith(_NOT_FORWARDED_PREFIXES)


# Loop mark: every upstream request carries the ids of the proxies it went through (a client's
# own `x-trioproxy-*` is never forwarded, so only proxies write it). A request that comes back
# to a proxy already on it is refused (508) instead of opening socket after socket to itself.
VIA_HEADER = "x-trioproxy-via"
INSTANCE = uuid.uuid4().hex[:12]
_VIA_HOPS = 16  # ids kept: enough for any real chain, bounded for a hostile one
_HOP_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def via(headers: list[tuple[str, str]]) -> tuple[str, str]:
    """This proxy's loop mark for a request that came with `headers`."""
    hops = [h.strip() for name, value in headers if name == VIA_HEADER for h in value.split(",")]
    kept = [hop for hop in hops if _HOP_ID.fullmatch(hop)][-_VIA_HOPS + 1 :]
    return VIA_HEADER, ", ".join([*kept, INSTANCE])


def looped(headers: list[tuple[str, str]]) -> bool:
    """Whether a request already went through this proxy (its upstream leads back to it)."""
    return any(
        hop.strip() == INSTANCE
        for name, value in headers
        if name == VIA_HEADER
        for hop in value.split(",")
    )


def forwarded(headers: list[tuple[str, str]], beta: str) -> list[tuple[str, str]]:
    """The headers sent on the upstream handshake, with the WebSocket-mode beta flag and the
    loop mark added."""
    out = [(name, value) for name, value in sendable(headers) if _forwardable(name)]
    out.append(via(headers))
    betas = [value for name, value in out if name == BETA_HEADER]
    out = [(name, value) for name, value in out if name != BETA_HEADER]
    merged = ", ".join(betas)
    if beta and beta.split("=", 1)[0] not in merged:
        merged = f"{merged}, {beta}" if merged else beta
    if merged:
        out.append((BETA_HEADER, merged))
    return out


_HOP = frozenset({"forwarded", "via", "x-real-ip", "origin", "referer"})
# Never relayed on a plain HTTP call: the hop's own framing and what would change its encoding.
_NOT_RELAYED = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "accept-encoding", "cookie"}
)


def relayed(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers sent on a relayed HTTP call (model list, compaction): the client's own,
    and the loop mark."""
    own = [
        (name, value)
        for name, value in sendable(headers)
        if name not in _NOT_RELAYED
        and not name.startswith(_NOT_FORWARDED_PREFIXES)
        and name not in _HOP
    ]
    return [*own, via(headers)]


def shared(sent: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A shared socket's handshake (lanes): what every session of its group sends alike,
    without any one session's id or per-request tracing, and with the loop mark."""
    return [(name, value) for name, value in sent if _meaningful(name) or name == VIA_HEADER]


def _meaningful(name: str) -> bool:
    """Part of the socket's identity: not per-request tracing, not the session (hashed on
    its own, so the group of a session is the group of the same request without it)."""
    return (
        name not in _PER_REQUEST
        and name not in SESSION_HEADERS
        and name not in _CONVERSATION_HEADERS
        and not name.startswith(_PER_REQUEST_PREFIXES)
    )


# How a request names its session: a session header, else the body's `prompt_cache_key`.
# The kind is hashed into the pool key, so a cache key never collides with a header's id.
Affinity = tuple[str, str]


def affinity(headers: list[tuple[str, str]], cache_key: object = None) -> Affinity | None:
    """("header", id), ("thread", id) or ("cache_key", key); None when the request names no
    session. A conversation header alone (Codex's `thread-id`) names its session too."""
    session = session_id(headers)
    if session is not None:
        return ("header", session)
    thread = _conversation(headers)
    if thread is not None:
        return ("thread", thread)
    if isinstance(cache_key, str) and cache_key:
        return ("cache_key", cache_key)
    return None


def _conversation(headers: list[tuple[str, str]]) -> str | None:
    """The first conversation header's value, trimmed (what goes upstream), if any."""
    for name, value in headers:
        if name in _CONVERSATION_HEADERS and value.strip():
            return value.strip()
    return None


def pool_key(
    upstream: str, headers: list[tuple[str, str]], beta: str, session: Affinity | None = None
) -> str | None:
    """The pool key of a session's socket (`session`, default: the request's session header),
    or None when the request names no session."""
    session = session if session is not None else affinity(headers)
    return _identity_key(upstream, headers, beta, session) if session is not None else None


def group_key(upstream: str, headers: list[tuple[str, str]], beta: str) -> str:
    """The request's credential group: every request that may share a socket with it (same
    upstream, credential and meaningful headers), whatever session it names."""
    return _identity_key(upstream, headers, beta, None)


def _identity_key(
    upstream: str, headers: list[tuple[str, str]], beta: str, session: Affinity | None
) -> str:
    digest = sha256()
    digest.update(upstream.encode())
    if session is not None:
        kind, value = session
        digest.update(b"\0" + kind.encode() + b"\0" + value.encode())
    # What replaced a credential (scope, channel, login: `x-trioproxy-*`, never forwarded)
    # counts as much as the headers that go upstream.
    marks = [(name, value) for name, value in headers if name.startswith("x-trioproxy-")]
    meaningful = [h for h in forwarded(headers, beta) if _meaningful(h[0])]
    thread = _conversation(headers)
    if session is not None and thread is not None:  # its conversation, beside its id
        meaningful.append(("thread-id", thread))
    for name, value in sorted([*meaningful, *marks]):
        # The credential and every other meaningful header enter only through this hash.
        digest.update(b"\0" + name.encode() + b"\0" + value.encode())
    return digest.hexdigest()[:32]


def bearer(headers: list[tuple[str, str]]) -> str:
    """The token of the `Authorization` header (lower-cased names), or ""."""
    for name, value in headers:
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else value.strip()
    return ""
