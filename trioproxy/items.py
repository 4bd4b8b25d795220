"""Canonical input items and their digests. Pure.

Prefix matching compares what a client echoes back with what the proxy sent and what the model
returned. Clients re-serialise those items, so equality is decided on a canonical form:

- key order is irrelevant (keys are sorted before hashing);
- `id` and `status` on an item are dropped: Codex omits output ids when it echoes items back,
  and `status` is a server-side progress marker, not content;
- a key whose value is `null` counts as absent (SDK models drop unset fields);
- a message without `type` is a `message` (the "easy input message" shape);
- a message whose `content` is a plain string equals the one-part list it stands for
  (`input_text`, or `output_text` for the assistant);
- empty `annotations` and `logprobs` on content parts are dropped (servers add them, clients
  drop them).

Everything else must match exactly: a false match would chain a turn onto a history the client
did not send, while a false mismatch only costs one full resend.

Each item becomes a 16-byte digest (SHA-256, truncated), and a conversation is the
concatenation of its item digests: a pooled session holds bytes, not its megabytes of history,
and "does this input begin with that conversation" is one `bytes.startswith`.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import sha256
from typing import Any

import orjson

DIGEST_SIZE = 16
_DROPPED_ITEM_KEYS = frozenset({"id", "status"})
_DROPPED_WHEN_EMPTY = frozenset({"annotations", "logprobs"})


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _canonical_part(part: Any) -> Any:
    if isinstance(part, dict):
        return {k: v for k, v in part.items() if not (k in _DROPPED_WHEN_EMPTY and v == [])}
    return part


def canonical_item(item: Any) -> Any:
    """The form two items are compared in; see the module docstring for the rule."""
    if not isinstance(item, dict):
        return item
    out = {k: v for k, v in _strip_nulls(item).items() if k not in _DROPPED_ITEM_KEYS}
    if "role" in out and "type" not in out:
        out["type"] = "message"
    if out.get("type") == "message":
        content = out.get("content")
        if isinstance(content, str):
            kind = "output_text" if out.get("role") == "assistant" else "input_text"
            out["content"] = [{"type": kind, "text": content}]
        elif isinstance(content, list):
            out["content"] = [_canonical_part(p) for p in content]
    return out


def _digest(text: bytes) -> bytes:
    # SHA-256 runs in hardware on current x86 and ARM servers: twice BLAKE2b's speed here,
    # and a Codex turn's first items are tens of KB.
    return sha256(text).digest()[:DIGEST_SIZE]


# Below this size an item's text is searched for what canonicalising would change; above it,
# walking the item is cheaper than searching its text (long strings, few keys).
_SEARCH_BYTES = 4096


def _unchanged(item: dict[str, Any], text: bytes) -> bool:
    """Whether `canonical_item` would leave `item` (its `id` and `status` already dropped) as
    it is, judged from its JSON `text`: no `null` anywhere, a message with a `type` and list
    content, no empty `annotations` or `logprobs`. Inside a JSON string every quote is
    escaped, so `"logprobs":[]` in the text is a key; a `null` inside a string only sends the
    item the slow way, which gives the same digest."""
    if b"null" in text:
        return False
    kind = item.get("type")
    if kind is None:
        return "role" not in item
    return kind != "message" or (
        not isinstance(item.get("content"), str)
        and b'"annotations":[]' not in text
        and b'"logprobs":[]' not in text
    )


def item_digest(item: Any) -> bytes:
    """The item's identity. A long session digests hundreds of items a turn, most of them
    small and already canonical: those are serialised once, checked and hashed."""
    if isinstance(item, dict):
        if not _DROPPED_ITEM_KEYS.isdisjoint(item):
            item = {k: v for k, v in item.items() if k not in _DROPPED_ITEM_KEYS}
        text = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
        if len(text) <= _SEARCH_BYTES and _unchanged(item, text):
            return _digest(text)
    return _digest(orjson.dumps(canonical_item(item), option=orjson.OPT_SORT_KEYS))


def digest_items(items: Iterable[Any]) -> bytes:
    """Concatenated item digests: the compact identity of a conversation prefix."""
    return b"".join(item_digest(i) for i in items)


def input_items(value: Any) -> list[Any]:
    """The request's `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return value
    return []


def digest_value(value: Any) -> bytes:
    """Digest of any JSON value, key order ignored: used for the request's parameters."""
    return _digest(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
