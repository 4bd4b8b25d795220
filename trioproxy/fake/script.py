"""What the fake model answers. Pure.

A test queues `Reply` objects for exact control; otherwise the answer follows from the
conversation, so a real client (Codex, the SDK, curl) can drive it by what it types:

- a user message containing a line `fake: call NAME {json args}` gets a function call;
- `fake: error CODE [STATUS]` an `error` event, `fake: fail CODE` a `response.failed`,
  `fake: incomplete` a `response.incomplete`, `fake: drop N` a socket closed after N events;
- a `function_call_output` as the newest item gets a message quoting the tool's output;
- anything else gets a message echoing the newest user text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

ReplyKind = Literal["text", "call", "error", "fail", "incomplete", "drop"]


@dataclass(frozen=True, slots=True)
class Reply:
    kind: ReplyKind = "text"
    text: str = ""
    name: str = ""
    arguments: str = "{}"
    code: str = ""
    status: int = 400
    after_events: int = 0  # for `drop`: events sent before the socket closes

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


def _directive(text: str) -> Reply | None:
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("fake:"):
            continue
        words = line[len("fake:") :].strip().split(None, 2)
        if not words:
            continue
        verb, rest = words[0], words[1:]
        if verb == "call" and rest:
            return Reply.call(rest[0], rest[1] if len(rest) > 1 else "{}")
        if verb == "error" and rest:
            return Reply.error(rest[0], int(rest[1]) if len(rest) > 1 else 400)
        if verb == "fail":
            return Reply("fail", code=rest[0] if rest else "server_error")
        if verb == "incomplete":
            return Reply("incomplete")
        if verb == "drop":
            return Reply.drop(int(rest[0]) if rest else 0)
    return None


def decide(conversation: list[Any]) -> Reply:
    """The default answer to a conversation (its full input, history included)."""
    last = conversation[-1] if conversation else {}
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        output = last.get("output")
        shown = output if isinstance(output, str) else json.dumps(output)
        return Reply.message(f"The tool returned: {shown.strip()[:400]}")
    for item in reversed(conversation):
        if isinstance(item, dict) and item.get("role") == "user":
            text = _text_of(item)
            directive = _directive(text)
            if directive is not None:
                return directive
            return Reply.message(f"You said: {text.strip()[:400]}")
    return Reply.message("Hello from the fake upstream.")
