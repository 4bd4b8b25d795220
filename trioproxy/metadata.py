"""Which upstream response headers reach the client. Pure.

Clients read response metadata from the provider's answer: Codex takes `openai-model`,
`x-reasoning-included`, `x-models-etag` and `x-codex-turn-state` from the WebSocket upgrade's 101
and the `x-codex-*` rate-limit and credit headers from an HTTP answer (its rate-limit display,
written to the session's rollout); OpenAI's API answers with `x-ratelimit-*`, `openai-model`,
`openai-organization`, `openai-project` and `openai-version`. Behind the proxy those come from
the upgrade of the socket that carries the turn (or the HTTP fallback's own answer) and are added
to every HTTP response of the turns it serves.

An allow-list, not a deny-list: hop-by-hop headers, cookies, framing, the upstream's own
`x-request-id` (the proxy names each request itself) and anything unknown stay behind. Values
must be sendable as they are, and the list is bounded, so an upstream cannot bloat or break
the client's response head.
"""

from __future__ import annotations

from collections.abc import Iterable

from trioproxy.keys import sendable

_EXACT = frozenset(
    {
        "openai-model",
        "openai-organization",
        "openai-project",
        "openai-version",
        "x-reasoning-included",
        "x-models-etag",
    }
)
_PREFIXES = ("x-codex-", "x-ratelimit-")
MAX_HEADERS = 48
MAX_VALUE = 1024

Headers = list[tuple[str, str]]


def client_metadata(headers: Iterable[tuple[bytes | str, bytes | str]]) -> Headers:
    """The response headers of an upstream answer that a client of the proxy gets too."""
    kept: Headers = []
    for raw_name, raw_value in headers:
        name = (raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name).lower()
        if name not in _EXACT and not name.startswith(_PREFIXES):
            continue
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        if len(value) <= MAX_VALUE:
            kept.append((name, value))
    return sendable(kept)[:MAX_HEADERS]
