"""Request diffing: what a turn sends upstream given what the socket already holds. Pure.

The rule is Codex's own (DESIGN.md section 2): a turn goes as its new items plus
`previous_response_id` only when every parameter but the input equals the previous turn's and the
input begins with the previous input followed by the previous response's output items (compared
as canonical items, see `items.py`) and adds at least one item. Anything else goes in full.
Parameters are always sent: `previous_response_id` does not carry `tools` or `instructions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
class Conversation:
    """What a socket remembers after a completed turn: digests and an id, never the items."""

    params: bytes
    items: bytes | None  # digests of input + output; None when the client chained by id itself
    response_id: str

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

    def remember(self, output: list[Any], response_id: str) -> Conversation:
        items = None if self.history is None else self.history + digest_items(output)
        return Conversation(self.params, items, response_id)


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
    history = digest_items(items)
    if (
        memory is not None
        and memory.items is not None
        and memory.params == params
        and len(history) > len(memory.items)
        and history.startswith(memory.items)
    ):
        suffix = items[memory.item_count :]
        return TurnPlan(
            "suffix", _message(body, suffix, memory.response_id), params, history, len(suffix)
        )
    return TurnPlan("full", _message(body, body.get("input"), None), params, history, len(items))
