"""Request diffing: what a turn sends upstream given what the socket already holds. Pure.

The rule is Codex's own (DESIGN.md section 2): a turn goes as its new items plus
`previous_response_id` only when every parameter but the input equals the previous turn's and the
input begins with the previous input followed by the previous response's output items (compared
as canonical items, see `items.py`) and adds at least one item. Anything else goes in full.
Parameters are always sent: `previous_response_id` does not carry `tools` or `instructions`.

An output item may reach the client in two forms: live reasoning models re-encrypt a reasoning
item between its `response.output_item.done` event (which Codex echoes) and the copy inside
`response.completed` (which SDK users echo), DESIGN.md section 2b. Either form continues the
chain: where the two differ the conversation keeps the other form's digest as an alternate.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Literal

import orjson

from trioproxy.items import DIGEST_SIZE, digest_items, digest_value, input_items, item_digest

# Never sent over the socket: the socket is a stream by nature and cannot run in background.
_NOT_SENT = frozenset({"stream", "background"})
# Not part of "the same request parameters": per-call delivery and client bookkeeping that
# Codex itself leaves out of its comparison (`client_metadata` changes every turn).
# `stream_id` names a WebSocket lane: routing, not a parameter of the conversation.
_NOT_COMPARED = frozenset(
    {
        "input",
        "previous_response_id",
        "stream",
        "background",
        "client_metadata",
        "stream_options",
        "stream_id",
    }
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


# (item position, a digest also accepted there): the other form of an output item.
Alternates = tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class Conversation:
    """What a socket remembers after a completed turn: digests and an id, never the items."""

    params: bytes
    items: bytes | None  # digests of input + output; None when the client chained by id itself
    response_id: str
    sent: Sent | None = None  # how the input whose digests begin `items` was sent
    # Positions of `items` where a second digest is accepted (an output item whose streamed
    # and final forms differ): 16 bytes more only for such items.
    alternates: Alternates = ()

    @property
    def item_count(self) -> int:
        return 0 if self.items is None else len(self.items) // DIGEST_SIZE

    def tails(self) -> tuple[bytes, ...]:
        """Digests the conversation's last item may have: what a continuing request holds
        just before its new items (the index of header-less conversations looks them up)."""
        if not self.items:
            return ()
        last = self.item_count - 1
        return (self.items[-DIGEST_SIZE:], *(alt for pos, alt in self.alternates if pos == last))

    def extended_by(self, history: bytes) -> Alternates | None:
        """If `history` (an input's item digests) continues this conversation with at least
        one new item, the alternates still valid for it, else None.

        Each output item may be in either of its forms; the form the client did not send
        stays accepted, so a client that switches forms later still continues the chain.
        """
        items = self.items
        if items is None or len(history) <= len(items):
            return None
        if history.startswith(items):
            return self.alternates
        if not self.alternates:
            return None
        patched = bytearray(items)
        carried = []
        for pos, alt in self.alternates:
            span = slice(pos * DIGEST_SIZE, (pos + 1) * DIGEST_SIZE)
            if history[span] == alt:
                carried.append((pos, items[span]))
                patched[span] = alt
            else:
                carried.append((pos, alt))
        return tuple(carried) if history.startswith(patched) else None


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """One turn's upstream message and what to remember once it completes."""

    mode: Mode
    message: dict[str, Any]
    params: bytes
    history: bytes | None  # digests of the whole logical input of this turn, if known
    new_items: int
    sent: Sent | None = None
    alternates: Alternates = ()  # of `history`, carried over from the socket's memory

    def remember(
        self, output: list[Any], streamed: dict[int, Any], response_id: str
    ) -> Conversation:
        """The socket's memory once this turn completed with `output` (the final response's
        items); `streamed` holds the `output_item.done` forms by output index."""
        if self.history is None:
            return Conversation(self.params, None, response_id, self.sent)
        digests = [item_digest(item) for item in output]
        alternates = list(self.alternates)
        base = len(self.history) // DIGEST_SIZE
        for index, item in streamed.items():
            if 0 <= index < len(digests):
                other = item_digest(item)
                if other != digests[index]:
                    alternates.append((base + index, other))
        items = self.history + b"".join(digests)
        return Conversation(self.params, items, response_id, self.sent, tuple(alternates))


def params_digest(body: dict[str, Any]) -> bytes:
    return digest_value({k: v for k, v in body.items() if k not in _NOT_COMPARED})


def client_chained(body: dict[str, Any]) -> str | None:
    """The `previous_response_id` the client sent itself, if any."""
    value = body.get("previous_response_id")
    return value if isinstance(value, str) and value else None


def _message(body: dict[str, Any], input_value: Any, previous: str | None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "response.create"}
    for key, value in body.items():
        # A body's own `type` would turn the create into another event (a steer aimed at a
        # response, an unknown event whose error lands on a shared socket's default lane).
        if key not in _NOT_SENT and key not in ("input", "previous_response_id", "type"):
            message[key] = value
    if previous is not None:
        message["previous_response_id"] = previous
    message["input"] = input_value
    return message


def digest_input(body: dict[str, Any]) -> tuple[bytes, Sent]:
    """The item digests of a request's input and how it was sent, before a socket is chosen
    (a request that names no session is placed by them; `plan_turn` then reuses them)."""
    return _history(None, input_items(body.get("input")))


def plan_turn(
    memory: Conversation | None,
    body: dict[str, Any],
    digested: tuple[bytes, Sent] | None = None,
) -> TurnPlan:
    """Decide full, suffix or pass-through for `body` on a socket that remembers `memory`
    (`digested`: what `digest_input` already computed for this body)."""
    params = params_digest(body)
    items = input_items(body.get("input"))
    chained = client_chained(body)
    if chained is not None:
        # The client manages the chain itself: send it untouched. If it continues this socket's
        # own conversation the proxy still knows the whole history for later turns.
        known: bytes | None = None
        carried: Alternates = ()
        if memory is not None and memory.items is not None and memory.response_id == chained:
            known, carried = memory.items + digest_items(items), memory.alternates
        message = _message(body, body.get("input"), chained)
        return TurnPlan("passthrough", message, params, known, len(items), alternates=carried)
    history, sent = digested if digested is not None else _history(memory, items)
    if memory is not None and memory.params == params:
        alternates = memory.extended_by(history)
        if alternates is not None:
            suffix = items[memory.item_count :]
            message = _message(body, suffix, memory.response_id)
            return TurnPlan("suffix", message, params, history, len(suffix), sent, alternates)
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
