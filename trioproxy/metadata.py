"""Which upstream response headers reach the client. Pure.

Clients read response metadata from the provider's answer: Codex takes `openai-model`,
`x-reasoning-included`, `x-models-etag` and `x-codex-turn-state` from the WebSocket upgrade's 101
and the `x-codex-*` rate-limit and credit headers from an HTTP answer (its rate-limit display,
written to the session's rollout); OpenAI's API answers with `x-ratelimit-*`, `openai-model`,
`openai-organization`, `openai-project` and `openai-version`. Behind the proxy those come from
the upgrade of the socket that carries the turn (or the HTTP fallback's own answer) and are added
to every HTTP response of the turns it serves.

In managed mode a client gets only the model headers (`for_tenant`): the organization, project
and rate limits are the operator's channel's, and its remaining budget would show every tenant
the others' use. Values taken from an upgrade answer are that moment's: on a socket kept for an
hour, rate limits are as old as the socket.

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


# What a managed client may see of its channel's metadata: the model, not the operator's
# organization, project or the shared key's remaining budget.
_FOR_TENANTS = frozenset({"openai-model", "x-reasoning-included", "x-models-etag"})


def for_tenant(headers: Headers) -> Headers:
    """The metadata a managed client gets: nothing about the channel's account or limits."""
    return [(name, value) for name, value in headers if name in _FOR_TENANTS]
