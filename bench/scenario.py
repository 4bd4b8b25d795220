"""The codex-shaped session: Codex 0.169.0's real first request, then a tool loop.

Turn 1 is the captured request (tests/data) with its free text refilled to the original sizes
with generated prose that compresses like English: about 40 KB (17.7 KB of tool schemas,
instructions and messages). The fake upstream answers each
turn with a function call streamed in 24 argument deltas (about 30 events a turn) until the last
turn, which is a message; every later request adds the call and its output, as Codex does.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parents[1] / "tests/data/codex-0.169.0-first-turn.json"
_PLACEHOLDER = re.compile(r"<(\d+) chars of text>")
_VOCABULARY = (
    "the a to of and in is for that with on as be it by this are or an from at you your if "
    "not can will use when file files command run test tests code change changes tool tools "
    "output input user model request response shell patch apply read write directory path "
    "repository git diff commit branch error errors warning value values function functions "
    "call calls return type types string number object array field fields name names "
    "default optional must should never always before after each every only also then than "
    "more most other first last next step steps plan task tasks work working tree make "
    "build install check line lines edit edits update updates create remove keep show list "
    "find search grep rg sandbox approval network access timeout seconds limit environment "
    "context instructions"
)
_WORDS = _VOCABULARY.split()


def _prose(length: int, seed: int) -> str:
    """Deterministic text with English's compressibility (deflate keeps about a third of it),
    so permessage-deflate is measured on something like Codex's instructions, not on a repeat."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < length:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18)))
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((". ", ". ", ", ", ".\n"))
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:length]


_FILLER = _prose(200_000, 2026)
TOOL_OUTPUT = "total 48\n" + "".join(
    f"-rw-r--r-- 1 dev dev {n:5d} file_{n}.py\n" for n in range(16)
)


def _fill(length: int, place: Iterator[int]) -> str:
    """A different stretch of the prose for each placeholder, as real text would be; the same
    for every session, as Codex's instructions and tools are."""
    start = (next(place) * 7919) % (len(_FILLER) - length) if length < len(_FILLER) else 0
    return _FILLER[start : start + length]


def _refill(value: Any, place: Iterator[int]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: _fill(int(m.group(1)), place), value)
    if isinstance(value, list):
        return [_refill(v, place) for v in value]
    if isinstance(value, dict):
        return {k: _refill(v, place) for k, v in value.items()}
    return value


def first_request(turns: int, session: int) -> dict[str, Any]:
    """Turn 1 of a session that will last `turns` turns."""
    body = _refill(json.loads(REFERENCE.read_text())["body"], itertools.count())
    body["prompt_cache_key"] = f"bench-session-{session}"
    steps = max(turns - 1, 0)
    script = (
        f"Session {session}: walk the files.\n"
        f'fake: steps {steps} exec_command {{"cmd": "ls -la src/module_#n && '
        f'grep -rn TODO src/module_#n | head -40"}}\n'
        "fake: deltas 24"
    )
    body["input"][-1]["content"] = [{"type": "input_text", "text": script}]
    return body


def continuation(output: list[Any]) -> list[dict[str, Any]]:
    """The items a client adds after a turn, as Codex does: every output item the model
    returned (its reasoning item included: the fake answers Codex's model as a reasoning
    model), then the tool's output for each call."""
    added: list[dict[str, Any]] = list(output)
    for call in output:
        if call.get("type") == "function_call":
            added.append(
                {"type": "function_call_output", "call_id": call["call_id"], "output": TOOL_OUTPUT}
            )
    return added
