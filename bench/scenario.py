"""The codex-shaped session: Codex 0.169.0's real first request, then a tool loop.

Turn 1 is the captured request (tests/data) with its free text refilled to the original sizes:
about 40 KB (17.7 KB of tool schemas, instructions and messages). The fake upstream answers each
turn with a function call streamed in 24 argument deltas (about 30 events a turn) until the last
turn, which is a message; every later request adds the call and its output, as Codex does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parents[1] / "tests/data/codex-0.169.0-first-turn.json"
_PLACEHOLDER = re.compile(r"<(\d+) chars of text>")
_FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 2000
TOOL_OUTPUT = "total 48\n" + "".join(
    f"-rw-r--r-- 1 dev dev {n:5d} file_{n}.py\n" for n in range(16)
)


def _refill(value: Any) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: _FILLER[: int(m.group(1))], value)
    if isinstance(value, list):
        return [_refill(v) for v in value]
    if isinstance(value, dict):
        return {k: _refill(v) for k, v in value.items()}
    return value


def first_request(turns: int, session: int) -> dict[str, Any]:
    """Turn 1 of a session that will last `turns` turns."""
    body = _refill(json.loads(REFERENCE.read_text())["body"])
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
    """The items a client adds after a turn: the model's call and the tool's output."""
    calls = [item for item in output if item.get("type") == "function_call"]
    added: list[dict[str, Any]] = []
    for call in calls:
        added.append(call)
        added.append(
            {"type": "function_call_output", "call_id": call["call_id"], "output": TOOL_OUTPUT}
        )
    return added
