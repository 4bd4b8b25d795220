"""Request diffing: what a turn sends upstream given what the socket already holds. Pure.

The rule is Codex's own (DESIGN.md section 2): a turn goes as its new items plus
`previous_response_id` only when every parameter but the input equals the previous turn's and the
input begins with the previous input followed by the previous response's output items (compared
as canonical items, see `items.py`) and adds at least one item. Anything else goes in full.
Parameters are always sent: `previous_response_id` does not carry `tools` or `instructions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Literal

import orjson

from trioproxy.items import DIGEST_SIZE, digest_items, digest_value, input_items

# Never sent over the socket: the socket is a stream by nature and cannot run in background.
_NOT_SENT = frozenset({"stream", "background"})
# Not part of "the same request parameters": per-call delivery and client bookkeeping that
# Codex itself leaves out of its comparison (`client_metadata` changes every turn).
_NOT_COMPARED = frozenset(
    {"input", "previous_response_id", "stream", "background", "client_metadata", "stream_options"}
)

Mode = Literal["full", "suffix", "passthrough"]


@dataclass(frozen=True, slots=True)
class Sent:
    """How a client serialised a turn's input: its JSON's length, item count, and a digest of
    that JSON without the closing bracket. A client that resends those items as it sent them
    (Codex does) begins its next input with the same bytes, which one hash pass confirms."""

    length: int
    count: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Conversation:
    """What a socket remembers after a completed turn: digests and an id, never the items."""

    params: bytes
    items: bytes | None  # digests of input + output; None when the client chained by id itself
    response_id: str
    sent: Sent | None = None  # how the input whose digests begin `items` was sent

    @property
    def item_count(self) -> int:
        return 0 if self.items is None else len(self.items) // DIGEST_SIZE


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """One turn's upstream message and what to remember once it completes."""

    mode: Mode
    message: dict[str, Any]
    params: bytes
    history: bytes | None  # digests of the whole logical input of this turn, if known
    new_items: int
    sent: Sent | None = None

    def remember(self, output: list[Any], response_id: str) -> Conversation:
        items = None if self.history is None else self.history + digest_items(output)
        return Conversation(self.params, items, response_id, self.sent)


def params_digest(body: dict[str, Any]) -> bytes:
    return digest_value({k: v for k, v in body.items() if k not in _NOT_COMPARED})


def client_chained(body: dict[str, Any]) -> str | None:
    """The `previous_response_id` the client sent itself, if any."""
    value = body.get("previous_response_id")
    return value if isinstance(value, str) and value else None


def _message(body: dict[str, Any], input_value: Any, previous: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "response.create"}
    for key, value in body.items():
        if key not in _NOT_SENT and key not in ("input", "previous_response_id"):
            message[key] = value
    if previous is not None:
        message["previous_response_id"] = previous
    message["input"] = input_value
    return message


def plan_turn(memory: Conversation | None, body: dict[str, Any]) -> TurnPlan:
    """Decide full, suffix or pass-through for `body` on a socket that remembers `memory`."""
    params = params_digest(body)
    items = input_items(body.get("input"))
    chained = client_chained(body)
    if chained is not None:
        # The client manages the chain itself: send it untouched. If it continues this socket's
        # own conversation the proxy still knows the whole history for later turns.
        known = (
            memory.items + digest_items(items)
            if memory is not None and memory.items is not None and memory.response_id == chained
            else None
        )
        return TurnPlan(
            "passthrough", _message(body, body.get("input"), chained), params, known, len(items)
        )
    history, sent = _history(memory, items)
    if (
        memory is not None
        and memory.items is not None
        and memory.params == params
        and len(history) > len(memory.items)
        and history.startswith(memory.items)
    ):
        suffix = items[memory.item_count :]
        message = _message(body, suffix, memory.response_id)
        return TurnPlan("suffix", message, params, history, len(suffix), sent)
    message = _message(body, body.get("input"), None)
    return TurnPlan("full", message, params, history, len(items), sent)


def _history(memory: Conversation | None, items: list[Any]) -> tuple[bytes, Sent]:
    """The item digests of `items`, and how they were sent.

    Every request resends the whole conversation, and digesting it item by item costs a
    Python call per item (1.3 ms a turn 400 turns in). When this input's JSON begins with the
    bytes of the socket's last input followed by a comma (so its last item ends there too),
    those items parse as the same values, so their digests are taken from memory and only the
    items after them are digested: one hash pass over the text instead.
    """
    text = orjson.dumps(items)
    view = memoryview(text)
    hasher = sha256()
    known = b""  # digests taken from memory, of the first `len(known) // DIGEST_SIZE` items
    hashed = 0  # bytes of `text` the hasher has taken
    last = memory.sent if memory is not None else None
    if (
        last is not None
        and memory is not None
        and memory.items is not None
        and last.length < len(text)
        and text[last.length - 1] == ord(",")  # the last input's final item ends right there
    ):
        hashed = last.length - 1
        hasher.update(view[:hashed])
        if hasher.digest()[:DIGEST_SIZE] == last.digest:
            known = memory.items[: DIGEST_SIZE * last.count]
    hasher.update(view[hashed : len(text) - 1])
    sent = Sent(len(text), len(items), hasher.digest()[:DIGEST_SIZE])
    return known + digest_items(items[len(known) // DIGEST_SIZE :]), sent
