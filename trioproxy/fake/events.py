"""The events a Responses stream is made of, built the way OpenAI's WebSocket mode sends them. Pure.

Every event here validates against the `openai` SDK's `ResponseStreamEvent` types (a test
proves it). Token counts are estimates (four bytes a token); `cached_tokens` counts the part of
the conversation the same socket already held, which is what a continuation earns upstream.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from trioproxy.fake.script import Reply
from trioproxy.items import input_items

_CHUNK_WORDS = 3


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def estimate_tokens(size_bytes: int) -> int:
    return max(1, size_bytes // 4)


def response_object(
    rid: str, request: dict[str, Any], status: str, output: list[Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model", "fake-model"),
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"),
        "prompt_cache_key": request.get("prompt_cache_key"),
        "reasoning": {"effort": None, "summary": None},
        "store": request.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools", []),
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": request.get("metadata") or {},
    }


def usage(input_bytes: int, cached_bytes: int, output_bytes: int) -> dict[str, Any]:
    input_tokens = estimate_tokens(input_bytes)
    cached = min(input_tokens, estimate_tokens(cached_bytes) if cached_bytes else 0)
    output_tokens = estimate_tokens(output_bytes)
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {
            "cached_tokens": cached,
            "cache_write_tokens": input_tokens - cached,
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _chunks(text: str) -> list[str]:
    words = text.split(" ")
    return [
        " ".join(words[i : i + _CHUNK_WORDS]) + (" " if i + _CHUNK_WORDS < len(words) else "")
        for i in range(0, len(words), _CHUNK_WORDS)
    ]


def _message_events(item_id: str, text: str) -> Iterator[dict[str, Any]]:
    item = {
        "id": item_id,
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    yield {"type": "response.output_item.added", "output_index": 0, "item": item}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    base = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield {"type": "response.content_part.added", **base, "part": part}
    for chunk in _chunks(text):
        yield {"type": "response.output_text.delta", **base, "delta": chunk, "logprobs": []}
    yield {"type": "response.output_text.done", **base, "text": text, "logprobs": []}
    done_part = {**part, "text": text}
    yield {"type": "response.content_part.done", **base, "part": done_part}


def _call_events(
    item_id: str, call_id: str, name: str, arguments: str, deltas: int = 4
) -> Iterator[dict[str, Any]]:
    item = {
        "id": item_id,
        "type": "function_call",
        "status": "in_progress",
        "call_id": call_id,
        "name": name,
        "arguments": "",
    }
    yield {"type": "response.output_item.added", "output_index": 0, "item": item}
    step = max(1, -(-len(arguments) // deltas))
    for i in range(0, len(arguments), step):
        yield {
            "type": "response.function_call_arguments.delta",
            "item_id": item_id,
            "output_index": 0,
            "delta": arguments[i : i + step],
        }
    yield {
        "type": "response.function_call_arguments.done",
        "item_id": item_id,
        "output_index": 0,
        "name": name,
        "arguments": arguments,
    }


def output_item(reply: Reply) -> dict[str, Any]:
    """The finished output item a reply produces (what `output_item.done` carries)."""
    if reply.kind == "call":
        return {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": new_id("call"),
            "name": reply.name,
            "arguments": reply.arguments,
        }
    return {
        "id": new_id("msg"),
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}],
    }


def response_events(
    rid: str, request: dict[str, Any], reply: Reply, *, input_bytes: int, cached_bytes: int
) -> tuple[list[dict[str, Any]], list[Any]]:
    """A whole response's events, numbered, and the output items it produced.

    `error`, `fail` and `incomplete` replies end the stream the way upstream does; `drop`
    replies are the text stream, which the server cuts short.
    """
    seq = itertools.count()
    created = response_object(rid, request, "in_progress", [], None)
    opening = [
        {"type": "response.created", "response": created},
        {"type": "response.in_progress", "response": created},
    ]
    if reply.kind == "error":
        message = reply.text or _error_message(reply.code, request)
        before = opening[: reply.after_events]  # an error after the response has begun
        return [
            *_numbered(before, seq),
            {
                "type": "error",
                "status": reply.status,
                "error": {
                    "type": "invalid_request_error" if reply.status < 500 else "server_error",
                    "code": reply.code,
                    "message": message,
                    "param": "previous_response_id"
                    if reply.code == "previous_response_not_found"
                    else None,
                },
            },
        ], []
    events: list[dict[str, Any]] = list(opening)
    if reply.kind == "fail":
        failed = response_object(rid, request, "failed", [], None)
        failed["error"] = {"code": reply.code, "message": f"The response failed: {reply.code}."}
        events.append({"type": "response.failed", "response": failed})
        return _numbered(events, seq), []
    item = output_item(
        reply
        if reply.kind in ("call",)
        else Reply.message(reply.text or "This answer was cut short.")
    )
    if item["type"] == "function_call":
        call = (item["id"], item["call_id"], item["name"], item["arguments"])
        events.extend(_call_events(*call, reply.deltas))
    else:
        events.extend(_message_events(item["id"], item["content"][0]["text"]))
    events.append({"type": "response.output_item.done", "output_index": 0, "item": item})
    output_bytes = len(str(item))
    final_usage = usage(input_bytes, cached_bytes, output_bytes)
    if reply.kind == "incomplete":
        final = response_object(rid, request, "incomplete", [item], final_usage)
        final["incomplete_details"] = {"reason": "max_output_tokens"}
        events.append({"type": "response.incomplete", "response": final})
    else:
        final = response_object(rid, request, "completed", [item], final_usage)
        events.append({"type": "response.completed", "response": final})
    return _numbered(events, seq), [item]


def _numbered(events: list[dict[str, Any]], seq: Iterator[int]) -> list[dict[str, Any]]:
    for event in events:
        event["sequence_number"] = next(seq)
    return events


def _error_message(code: str, request: dict[str, Any]) -> str:
    if code == "previous_response_not_found":
        return f"Previous response with id '{request.get('previous_response_id')}' not found."
    return f"Upstream error: {code}."


def compacted(request: dict[str, Any]) -> dict[str, Any]:
    """`POST /responses/compact`: the user messages kept, the rest folded into one item."""
    items = input_items(request.get("input"))
    users = [item for item in items if isinstance(item, dict) and item.get("role") == "user"]
    kept = [{"type": "message", **item} for item in users]
    folded = json.dumps([item for item in items if item not in users])
    summary = base64.b64encode(f"{len(items) - len(users)} items: {folded[:200]}".encode())
    compaction = {"type": "compaction", "id": new_id("cmp"), "encrypted_content": summary.decode()}
    size = len(json.dumps(items))
    return {
        "id": new_id("resp"),
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [*kept, compaction],
        "usage": usage(size, 0, len(json.dumps(compaction))),
    }
