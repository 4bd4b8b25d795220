"""What the fake model answers. Pure.

A test queues `Reply` objects for exact control; otherwise the answer follows from the
conversation, so a real client (Codex, the SDK, curl) can drive it by what it types:

- a user message containing a line `fake: call NAME {json args}` gets a function call;
- `fake: steps N NAME {json args}` gets a tool loop: N calls, one per turn (`#n` in the
  arguments becomes the step number), then a message quoting the last tool output;
- `fake: slow SECONDS` (beside any of these) paces every event of the reply, and
  `fake: deltas N` streams a function call's arguments in N deltas;
- `fake: error CODE [STATUS [N]]` an `error` event (after N opening events),
  `fake: fail CODE` a `response.failed`, `fake: incomplete` a `response.incomplete`,
  `fake: drop N` a socket closed after N events, `fake: stall N` silence after N events,
  `fake: long N` a message of N words (a long stream);
- a `function_call_output` as the newest item gets a message quoting the tool's output;
- anything else gets a message echoing the newest user text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal

ReplyKind = Literal["text", "call", "error", "fail", "incomplete", "drop", "stall", "garbage"]


@dataclass(frozen=True, slots=True)
class Reply:
    kind: ReplyKind = "text"
    text: str = ""
    name: str = ""
    arguments: str = "{}"
    code: str = ""
    status: int = 400
    after_events: int = 0  # events before: `drop` the close, `error` the error, `stall` silence
    delay: float = 0.0  # seconds before each event (0: the server's default pace)
    deltas: int = 4  # argument deltas a function call streams in
    # Frames sent before the reply's own, as a misbehaving upstream would (a late event of an
    # earlier response arriving as this turn begins).
    prelude: tuple[str, ...] = ()

    @classmethod
    def message(cls, text: str) -> Reply:
        return cls("text", text=text)

    @classmethod
    def call(cls, name: str, arguments: dict[str, Any] | str) -> Reply:
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return cls("call", name=name, arguments=args)

    @classmethod
    def error(cls, code: str, status: int = 400, message: str = "") -> Reply:
        return cls("error", code=code, status=status, text=message)

    @classmethod
    def drop(cls, after_events: int) -> Reply:
        return cls("drop", after_events=after_events)


def _text_of(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _directive(text: str, outputs_since: int) -> Reply | None:
    """The reply a user message's `fake:` lines ask for, given the tool outputs since it."""
    reply: Reply | None = None
    delay = 0.0
    deltas = 0
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("fake:"):
            continue
        words = line[len("fake:") :].strip().split(None, 2)
        if not words:
            continue
        verb, rest = words[0], words[1:]
        if verb == "slow" and rest:
            delay = float(rest[0])
        elif verb == "deltas" and rest:
            deltas = int(rest[0])
        elif verb == "steps" and len(rest) == 2:
            name, _, args = rest[1].partition(" ")
            if outputs_since < int(rest[0]):
                reply = Reply.call(name, (args or "{}").replace("#n", str(outputs_since + 1)))
        elif outputs_since:
            continue  # the tool has answered: the model comments on it (see `decide`)
        elif verb == "call" and rest:
            reply = Reply.call(rest[0], rest[1] if len(rest) > 1 else "{}")
        elif verb == "error" and rest:
            status, *after = rest[1].split() if len(rest) > 1 else ["400"]
            late = int(after[0]) if after else 0
            reply = replace(Reply.error(rest[0], int(status)), after_events=late)
        elif verb == "fail":
            reply = Reply("fail", code=rest[0] if rest else "server_error")
        elif verb == "incomplete":
            reply = Reply("incomplete")
        elif verb == "drop":
            reply = Reply.drop(int(rest[0]) if rest else 0)
        elif verb == "stall":
            reply = Reply("stall", after_events=int(rest[0]) if rest else 0)
        elif verb == "long" and rest:
            reply = Reply.message(" ".join(f"w{n}" for n in range(int(rest[0]))))
    if reply is None and not delay:
        return None
    reply = reply or Reply("text")  # text filled in by `decide`
    return replace(reply, delay=delay, deltas=deltas or reply.deltas)


def decide(conversation: list[Any]) -> Reply:
    """The default answer to a conversation (its full input, history included)."""
    outputs = 0
    for item in reversed(conversation):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call_output":
            outputs += 1
        if item.get("role") == "user":
            text = _text_of(item)
            reply = _directive(text, outputs) or Reply()
            if reply.kind == "text" and not reply.text:
                return replace(reply, text=_default_text(conversation, text))
            return reply
    return Reply.message(_default_text(conversation, ""))


def _default_text(conversation: list[Any], user_text: str) -> str:
    last = conversation[-1] if conversation else {}
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        output = last.get("output")
        shown = output if isinstance(output, str) else json.dumps(output)
        return f"The tool returned: {shown.strip()[:400]}"
    if user_text:
        return f"You said: {user_text.strip()[:400]}"
    return "Hello from the fake upstream."
