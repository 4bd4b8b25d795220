"""The events a Responses stream is made of, built the way OpenAI's WebSocket mode sends them. Pure.

Every event here validates against the `openai` SDK's `ResponseStreamEvent` types (a test
proves it). Token counts are estimates (four bytes a token); `cached_tokens` counts the part of
the conversation the same socket already held, which is what a continuation earns upstream.

Reasoning models (`gpt-5*` and later, `o1`/`o3`/`o4-*`, Codex's models, any request with
`reasoning`) answer as the live API does (DESIGN.md section 2b): a reasoning item first,
announced with `encrypted_content: null`, its summary streamed, its ciphertext in
`output_item.done`, and a *different* ciphertext for the same item inside `response.completed`
(live responses re-encrypt it in between; `reencrypt=False` turns that off). The ciphertext is
there only when `include` asks for `reasoning.encrypted_content`, and assistant messages carry
`phase`.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from trioproxy.fake.script import Reply
from trioproxy.items import input_items

_CHUNK_WORDS = 3
_REASONING_MODEL = re.compile(r"(gpt-[5-9]|o[1-9]|codex)")
ENCRYPTED = "reasoning.encrypted_content"


def reasons(request: dict[str, Any]) -> bool:
    """Whether the live API would answer this request with a reasoning item first."""
    model = request.get("model")
    if isinstance(model, str) and _REASONING_MODEL.match(model):
        return True
    return bool(request.get("reasoning"))


def ciphertext(item_id: str) -> str:
    """An opaque reasoning blob the size live ones start at; each call makes another."""
    payload = f"{item_id}:{os.urandom(12).hex()}:".encode() + os.urandom(384)
    return "gAAAAA" + base64.urlsafe_b64encode(payload).decode()


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
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
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


def usage(
    input_bytes: int, cached_bytes: int, output_bytes: int, *, reasoning: bool = False
) -> dict[str, Any]:
    input_tokens = estimate_tokens(input_bytes)
    cached = min(input_tokens, estimate_tokens(cached_bytes) if cached_bytes else 0)
    reasoning_tokens = 64 if reasoning else 0
    output_tokens = estimate_tokens(output_bytes) + reasoning_tokens
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {
            "cached_tokens": cached,
            "cache_write_tokens": input_tokens - cached,
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def _chunks(text: str) -> list[str]:
    words = text.split(" ")
    return [
        " ".join(words[i : i + _CHUNK_WORDS]) + (" " if i + _CHUNK_WORDS < len(words) else "")
        for i in range(0, len(words), _CHUNK_WORDS)
    ]


def _message_events(
    item_id: str, text: str, index: int = 0, phase: str | None = None
) -> Iterator[dict[str, Any]]:
    item: dict[str, Any] = {
        "id": item_id,
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    if phase is not None:
        item["phase"] = phase
    yield {"type": "response.output_item.added", "output_index": index, "item": item}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    base = {"item_id": item_id, "output_index": index, "content_index": 0}
    yield {"type": "response.content_part.added", **base, "part": part}
    for chunk in _chunks(text):
        yield {"type": "response.output_text.delta", **base, "delta": chunk, "logprobs": []}
    yield {"type": "response.output_text.done", **base, "text": text, "logprobs": []}
    done_part = {**part, "text": text}
    yield {"type": "response.content_part.done", **base, "part": done_part}


def _call_events(
    item_id: str, call_id: str, name: str, arguments: str, deltas: int = 4, index: int = 0
) -> Iterator[dict[str, Any]]:
    item = {
        "id": item_id,
        "type": "function_call",
        "status": "in_progress",
        "call_id": call_id,
        "name": name,
        "arguments": "",
    }
    yield {"type": "response.output_item.added", "output_index": index, "item": item}
    step = max(1, -(-len(arguments) // deltas))
    for i in range(0, len(arguments), step):
        yield {
            "type": "response.function_call_arguments.delta",
            "item_id": item_id,
            "output_index": index,
            "delta": arguments[i : i + step],
        }
    yield {
        "type": "response.function_call_arguments.done",
        "item_id": item_id,
        "output_index": index,
        "name": name,
        "arguments": arguments,
    }


def _reasoning_events(
    request: dict[str, Any], reply: Reply, *, reencrypt: bool
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """A reasoning item's events at output index 0, its streamed (`output_item.done`) form
    and its final (`response.completed`) form."""
    item_id = new_id("rs")
    summary = "Planning a tool call." if reply.kind == "call" else "Working out the answer."
    base = {"item_id": item_id, "output_index": 0, "summary_index": 0}
    announced: dict[str, Any] = {
        "id": item_id,
        "type": "reasoning",
        "summary": [],
        "encrypted_content": None,
    }
    events: list[dict[str, Any]] = [
        {"type": "response.output_item.added", "output_index": 0, "item": announced},
        {
            "type": "response.reasoning_summary_part.added",
            **base,
            "part": {"type": "summary_text", "text": ""},
        },
    ]
    events.extend(
        {"type": "response.reasoning_summary_text.delta", **base, "delta": chunk}
        for chunk in _chunks(summary)
    )
    done_part = {"type": "summary_text", "text": summary}
    events.append({"type": "response.reasoning_summary_text.done", **base, "text": summary})
    events.append({"type": "response.reasoning_summary_part.done", **base, "part": done_part})
    include = request.get("include")
    encrypted = isinstance(include, list) and ENCRYPTED in include
    streamed = {
        "id": item_id,
        "type": "reasoning",
        "summary": [done_part],
        "encrypted_content": ciphertext(item_id) if encrypted else None,
    }
    events.append({"type": "response.output_item.done", "output_index": 0, "item": streamed})
    final = dict(streamed)
    if encrypted and reencrypt:
        final["encrypted_content"] = ciphertext(item_id)
    return events, streamed, final


def output_item(reply: Reply, phase: str | None = None) -> dict[str, Any]:
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
    message: dict[str, Any] = {
        "id": new_id("msg"),
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}],
    }
    if phase is not None:
        message["phase"] = phase
    return message


def response_events(
    rid: str,
    request: dict[str, Any],
    reply: Reply,
    *,
    input_bytes: int,
    cached_bytes: int,
    reencrypt: bool = True,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """A whole response's events, numbered, and the output items it produced (their final
    forms, as `response.completed` carries them).

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
        return [*_numbered(opening[: reply.after_events], seq), _error_event(reply, request)], []
    events: list[dict[str, Any]] = list(opening)
    if reply.kind == "fail":
        failed = response_object(rid, request, "failed", [], None)
        failed["error"] = {"code": reply.code, "message": f"The response failed: {reply.code}."}
        events.append({"type": "response.failed", "response": failed})
        return _numbered(events, seq), []
    final_items: list[Any] = []
    reasoning = reasons(request)
    if reasoning:
        thinking, _, final_reasoning = _reasoning_events(request, reply, reencrypt=reencrypt)
        events.extend(thinking)
        final_items.append(final_reasoning)
    index = len(final_items)
    phase = "final_answer" if reasoning else None
    item = output_item(
        reply
        if reply.kind == "call"
        else Reply.message(reply.text or "This answer was cut short."),
        phase if reply.kind != "call" else None,
    )
    if item["type"] == "function_call":
        call = (item["id"], item["call_id"], item["name"], item["arguments"])
        events.extend(_call_events(*call, reply.deltas, index))
    else:
        events.extend(_message_events(item["id"], item["content"][0]["text"], index, phase))
    events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    final_items.append(item)
    output_bytes = len(str(item))
    final_usage = usage(input_bytes, cached_bytes, output_bytes, reasoning=reasoning)
    if reply.kind == "incomplete":
        final = response_object(rid, request, "incomplete", final_items, final_usage)
        final["incomplete_details"] = {"reason": "max_output_tokens"}
        events.append({"type": "response.incomplete", "response": final})
    else:
        final = response_object(rid, request, "completed", final_items, final_usage)
        events.append({"type": "response.completed", "response": final})
    return _numbered(events, seq), final_items


def _error_event(reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "error",
        "status": reply.status,
        "error": {
            "type": "invalid_request_error" if reply.status < 500 else "server_error",
            "code": reply.code,
            "message": reply.text or _error_message(reply.code, request),
            "param": "previous_response_id"
            if reply.code == "previous_response_not_found"
            else None,
        },
    }


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
