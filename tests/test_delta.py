"""The suffix rule: when a turn can go as new items plus `previous_response_id`."""

from __future__ import annotations

import copy
import dataclasses
import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trioproxy import delta
from trioproxy.delta import Conversation, plan_turn
from trioproxy.items import canonical_item, digest_items, item_digest

# A copy of shared/reference/: Codex 0.169.0's real first request, free text replaced by lengths.
REFERENCE = Path(__file__).resolve().parent / "data"


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
        **extra,
    }


def completed(body: dict[str, Any], output: list[Any], rid: str = "resp_1") -> Conversation:
    """The memory a socket holds after `body` completed with `output`."""
    plan = plan_turn(None, body)
    return plan.remember(output, {}, rid)


ASSISTANT = {
    "id": "msg_a1",
    "type": "message",
    "status": "completed",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "hi", "annotations": [], "logprobs": []}],
}
CALL = {
    "id": "fc_1",
    "type": "function_call",
    "status": "completed",
    "call_id": "call_1",
    "name": "exec_command",
    "arguments": '{"cmd":"ls"}',
}


def body(items: list[Any], **params: Any) -> dict[str, Any]:
    return {
        "model": "gpt-5",
        "input": items,
        "tools": [{"type": "function", "name": "f"}],
        "stream": True,
        **params,
    }


def test_first_turn_is_full_and_strips_stream() -> None:
    plan = plan_turn(None, body([user("a")]))
    assert plan.mode == "full"
    assert plan.message["type"] == "response.create"
    assert "stream" not in plan.message and "background" not in plan.message
    assert "previous_response_id" not in plan.message
    assert plan.message["input"] == [user("a")]
    assert plan.message["tools"] == [{"type": "function", "name": "f"}]


def test_extended_history_goes_as_suffix_with_all_params() -> None:
    first = body([user("a")])
    memory = completed(first, [ASSISTANT])
    plan = plan_turn(memory, body([user("a"), ASSISTANT, user("b")]))
    assert plan.mode == "suffix"
    assert plan.message["previous_response_id"] == "resp_1"
    assert plan.message["input"] == [user("b")]
    assert plan.message["tools"] == first["tools"], "tools are not carried by the id"
    assert plan.new_items == 1


def test_equal_input_is_not_a_suffix() -> None:
    first = body([user("a")])
    memory = completed(first, [ASSISTANT])
    assert plan_turn(memory, body([user("a"), ASSISTANT])).mode == "full"


def test_edited_history_goes_full() -> None:
    memory = completed(body([user("a"), user("b")]), [ASSISTANT])
    plan = plan_turn(memory, body([user("a"), user("B edited"), ASSISTANT, user("c")]))
    assert plan.mode == "full"
    assert "previous_response_id" not in plan.message


def test_dropped_output_goes_full() -> None:
    """A client that does not echo the response's output is not continuing it."""
    memory = completed(body([user("a")]), [ASSISTANT])
    assert plan_turn(memory, body([user("a"), user("b")])).mode == "full"


def test_changed_params_go_full() -> None:
    memory = completed(body([user("a")]), [ASSISTANT])
    assert plan_turn(memory, body([user("a"), ASSISTANT, user("b")], model="gpt-4")).mode == "full"
    assert plan_turn(memory, body([user("a"), ASSISTANT, user("b")], tools=[])).mode == "full"
    assert (
        plan_turn(memory, body([user("a"), ASSISTANT, user("b")], instructions="new")).mode
        == "full"
    )


def test_per_call_fields_do_not_break_the_chain() -> None:
    """`client_metadata` (Codex changes it every turn) and `stream` are not parameters."""
    memory = completed(body([user("a")], client_metadata={"turn_id": "1"}), [ASSISTANT])
    plan = plan_turn(
        memory,
        body([user("a"), ASSISTANT, user("b")], stream=False, client_metadata={"turn_id": "2"}),
    )
    assert plan.mode == "suffix"
    assert plan.message["client_metadata"] == {"turn_id": "2"}


def test_reordered_keys_match() -> None:
    memory = completed(body([user("a")]), [ASSISTANT])
    reordered = json.loads(json.dumps(ASSISTANT, sort_keys=True))
    reordered["content"] = [dict(reversed(list(p.items()))) for p in reordered["content"]]
    params = body([user("a"), reordered, user("b")])
    params = dict(reversed(list(params.items())))
    assert plan_turn(memory, params).mode == "suffix"


def test_output_echoed_back_reserialised_matches() -> None:
    """Clients echo outputs without id/status/empty annotations, string content, nulls."""
    memory = completed(body([user("a")]), [ASSISTANT, CALL])
    echoed_message = {"role": "assistant", "content": "hi"}
    echoed_call = {
        "type": "function_call",
        "call_id": "call_1",
        "name": "exec_command",
        "arguments": '{"cmd":"ls"}',
        "id": None,
    }
    output = {"type": "function_call_output", "call_id": "call_1", "output": "file.txt"}
    plan = plan_turn(memory, body([user("a"), echoed_message, echoed_call, output]))
    assert plan.mode == "suffix"
    assert plan.message["input"] == [output]


def test_changed_arguments_do_not_match() -> None:
    memory = completed(body([user("a")]), [CALL])
    changed = {**CALL, "arguments": '{"cmd":"rm"}'}
    assert plan_turn(memory, body([user("a"), changed, user("b")])).mode == "full"


def test_string_input_equals_its_message() -> None:
    memory = completed(body("hello"), [ASSISTANT])  # type: ignore[arg-type]
    plan = plan_turn(memory, body([{"role": "user", "content": "hello"}, ASSISTANT, user("b")]))
    assert plan.mode == "suffix"


def test_explicit_previous_response_id_is_passed_through() -> None:
    memory = completed(body([user("a")]), [ASSISTANT], rid="resp_1")
    same = plan_turn(memory, body([user("b")], previous_response_id="resp_1"))
    assert same.mode == "passthrough"
    assert same.message["previous_response_id"] == "resp_1"
    assert same.message["input"] == [user("b")]
    # Continuing this socket's own chain keeps the history, so a later full request still
    # goes as a suffix.
    after = same.remember([ASSISTANT], {}, "resp_2")
    assert after.items == digest_items([user("a"), ASSISTANT, user("b"), ASSISTANT])
    other = plan_turn(memory, body([user("b")], previous_response_id="resp_other"))
    assert other.mode == "passthrough"
    assert other.message["previous_response_id"] == "resp_other"
    assert other.remember([ASSISTANT], {}, "resp_3").items is None  # history unknown


def test_a_long_conversation_costs_sixteen_bytes_an_item() -> None:
    items = [user("x" * 1000) for _ in range(500)]
    memory = completed(body(items), [ASSISTANT])
    assert memory.items is not None and len(memory.items) == 16 * 501


def test_codex_reference_turn_and_its_tool_loop() -> None:
    """Codex's real first turn, then its tool-loop request as Codex builds it (input = first
    input + the function_call it got back, re-serialised + the function_call_output)."""
    captured = json.loads((REFERENCE / "codex-0.169.0-first-turn.json").read_text())["body"]
    reasoning = {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [],
        "encrypted_content": "gAAAA-opaque",
    }
    call = {
        "id": "fc_9",
        "type": "function_call",
        "status": "completed",
        "call_id": "call_9",
        "name": "exec_command",
        "arguments": '{"cmd":"echo hi"}',
    }
    memory = completed(captured, [reasoning, call])
    second = copy.deepcopy(captured)
    second["client_metadata"]["turn_id"] = "changes-every-request"
    echoed_reasoning = {
        "type": "reasoning",
        "summary": [],
        "content": None,
        "encrypted_content": "gAAAA-opaque",
    }
    echoed_call = {
        "type": "function_call",
        "name": "exec_command",
        "arguments": '{"cmd":"echo hi"}',
        "call_id": "call_9",
    }
    result = {"type": "function_call_output", "call_id": "call_9", "output": "hi\n"}
    second["input"] = [*captured["input"], echoed_reasoning, echoed_call, result]
    plan = plan_turn(memory, second)
    assert plan.mode == "suffix"
    assert plan.message["input"] == [result]
    full = len(json.dumps(plan_turn(None, second).message))
    suffix = len(json.dumps(plan.message))
    assert suffix < full


def test_canonical_form_rules() -> None:
    assert canonical_item({"role": "user", "content": "x"}) == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "x"}],
    }
    assert item_digest({"b": 1, "a": 2}) == item_digest({"a": 2, "b": 1})
    assert item_digest(user("a", id="msg_1", status="completed")) == item_digest(user("a"))
    assert item_digest(user("a")) != item_digest(user("b"))
    with_annotations = {"type": "output_text", "text": "t", "annotations": [{"x": 1}]}
    assert item_digest({"role": "assistant", "content": [with_annotations]}) != item_digest(
        {"role": "assistant", "content": "t"}
    )


# Items built from the keys and values canonicalisation cares about, nested a few levels deep.
_KEYS = st.sampled_from(
    ["id", "status", "type", "role", "content", "text", "annotations", "logprobs", "output"]
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-9, 9)
    | st.sampled_from(
        ["message", "user", "assistant", "output_text", "null", '"annotations":[]', "x"]
    )
)
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4)
)


_PARTS = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["output_text", "input_text"]),
            "text": st.sampled_from(["a", "null"]),
        },
        optional={"annotations": st.just([]) | _VALUES, "logprobs": st.just([]) | _VALUES},
    ),
    max_size=3,
)
_MESSAGES = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"])},
    optional={
        "type": st.sampled_from(["message", "other"]),
        "content": st.sampled_from(["hi", "null"]) | _PARTS | _VALUES,
        "id": _SCALARS,
        "status": _SCALARS,
    },
)


@settings(max_examples=1_000, derandomize=True)
@given(_MESSAGES | st.dictionaries(_KEYS, _VALUES, max_size=6) | _VALUES)
def test_the_quick_digest_is_the_canonical_digest(item: Any) -> None:
    """`item_digest` skips canonicalising items it can tell are canonical already; whatever it
    is given, the digest must be that of the canonical form."""
    _same_as_canonical(item)


@settings(max_examples=1_000, derandomize=True)
@given(_MESSAGES)
@example({"type": "message", "role": "assistant", "content": [{"text": "a", "logprobs": []}]})
@example({"type": "message", "role": "user", "content": [{"text": "a", "annotations": []}]})
@example({"role": "user", "content": [{"type": "input_text", "text": "a"}]})
def test_the_quick_digest_of_messages_is_the_canonical_digest(item: Any) -> None:
    """Messages are where canonicalising changes most (string content, empty annotations)."""
    _same_as_canonical(item)


def _same_as_canonical(item: Any) -> None:
    text = orjson.dumps(canonical_item(item), option=orjson.OPT_SORT_KEYS)
    assert item_digest(item) == sha256(text).digest()[:16]
    assert item_digest(item) == item_digest(orjson.loads(orjson.dumps(canonical_item(item))))


def test_a_resent_input_is_not_digested_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long session resends every item each turn; the items of the last request, resent
    byte for byte, take their digests from memory and only the rest are digested."""
    history = [user(f"message {n}") for n in range(200)]
    memory = completed(body(history), [CALL])
    echoed = {k: v for k, v in CALL.items() if k not in ("id", "status")}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "ok"}
    second = body([*history, echoed, result])
    digested: list[Any] = []

    def counting(items: Any) -> bytes:
        items = list(items)
        digested.extend(items)
        return digest_items(items)

    monkeypatch.setattr(delta, "digest_items", counting)
    plan = plan_turn(memory, second)
    assert plan.mode == "suffix" and plan.message["input"] == [result]
    assert digested == [echoed, result]
    # Re-serialised differently (keys reordered), the same items are digested one by one.
    digested.clear()
    reordered = [dict(reversed(item.items())) for item in history]
    plan = plan_turn(memory, body([*reordered, echoed, result]))
    assert plan.mode == "suffix" and len(digested) == 202


def test_a_resent_prefix_must_end_where_an_item_ends() -> None:
    """`[1` begins `[12,...` too: bytes alone would take 12 for the 1 the last turn sent."""
    memory = completed(body([1]), [])
    plan = plan_turn(memory, body([12, user("b")]))
    assert plan.mode == "full" and plan.history == digest_items([12, user("b")])


_ITEMS = _MESSAGES | st.dictionaries(_KEYS, _VALUES, max_size=4) | _VALUES


@settings(max_examples=500, derandomize=True)
@given(
    first=st.lists(_ITEMS, max_size=4),
    output=st.lists(_ITEMS, max_size=3),
    resend=st.sampled_from(["as sent", "reordered", "edited", "other"]),
    other=st.lists(_ITEMS, max_size=4),
    new=st.lists(_ITEMS, min_size=1, max_size=3),
)
@example(first=[1], output=[], resend="other", other=[12], new=[None])
def test_reusing_the_last_turn_s_digests_changes_no_plan(
    first: list[Any], output: list[Any], resend: str, other: list[Any], new: list[Any]
) -> None:
    """Whatever the client resends, the plan is the one digesting every item would make."""
    memory = completed(body(first), output)
    if resend == "reordered":
        first = [dict(reversed(i.items())) if isinstance(i, dict) else i for i in first]
    elif resend == "edited" and first:
        first = [{"edited": True}, *first[1:]]
    elif resend == "other":
        first = other
    request = body([*first, *output, *new])
    reused = plan_turn(memory, request)
    each = plan_turn(dataclasses.replace(memory, sent=None), request)
    assert (reused.mode, reused.message, reused.history, reused.new_items) == (
        each.mode,
        each.message,
        each.history,
        each.new_items,
    )
    assert reused.sent == plan_turn(None, request).sent


# -- either form of an output item (DESIGN.md section 2b) ------------------------------------------
def reasoning_item(ciphertext: str, rid: str = "rs_1") -> dict[str, Any]:
    return {
        "id": rid,
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": "Thinking it over."}],
        "encrypted_content": ciphertext,
    }


def reencrypted(first: list[Any]) -> tuple[Conversation, dict[str, Any], dict[str, Any]]:
    """A socket after a turn whose reasoning item streamed as `done` and came back as `final`
    inside `response.completed` (live models re-encrypt it in between)."""
    done, final = reasoning_item("gAAA-streamed"), reasoning_item("gAAA-final")
    plan = plan_turn(None, body(first))
    memory = plan.remember([final, ASSISTANT], {0: done, 1: ASSISTANT}, "resp_1")
    return memory, done, final


def test_either_form_of_a_reencrypted_reasoning_item_continues_the_chain() -> None:
    memory, done, final = reencrypted([user("a")])
    for form in (done, final):  # Codex echoes `done`, SDK users echo the final output
        plan = plan_turn(memory, body([user("a"), form, ASSISTANT, user("b")]))
        assert plan.mode == "suffix", form["encrypted_content"]
        assert plan.message["input"] == [user("b")]
        assert plan.message["previous_response_id"] == "resp_1"


def test_a_third_ciphertext_or_an_edited_item_still_goes_in_full() -> None:
    memory, done, _ = reencrypted([user("a")])
    other = reasoning_item("gAAA-someone-elses")
    assert plan_turn(memory, body([user("a"), other, ASSISTANT, user("b")])).mode == "full"
    edited = {**done, "summary": [{"type": "summary_text", "text": "Edited."}]}
    assert plan_turn(memory, body([user("a"), edited, ASSISTANT, user("b")])).mode == "full"
    changed = {**ASSISTANT, "content": [{"type": "output_text", "text": "not what it said"}]}
    assert plan_turn(memory, body([user("a"), done, changed, user("b")])).mode == "full"


def test_only_items_whose_forms_differ_cost_an_extra_digest() -> None:
    memory, _, _ = reencrypted([user("a")])
    assert memory.items is not None and len(memory.items) == 16 * 3
    assert [pos for pos, _ in memory.alternates] == [1]  # the reasoning item, not the message
    assert all(len(digest) == 16 for _, digest in memory.alternates)


def test_the_other_form_stays_accepted_on_later_turns() -> None:
    """A client that echoed the streamed form once and the final form later (or a proxy
    restart in between) still continues: both forms are remembered for the whole chain."""
    memory, done, final = reencrypted([user("a")])
    turn2 = plan_turn(memory, body([user("a"), done, ASSISTANT, user("b")]))
    after2 = turn2.remember([ASSISTANT], {0: ASSISTANT}, "resp_2")
    turn3 = plan_turn(after2, body([user("a"), final, ASSISTANT, user("b"), ASSISTANT, user("c")]))
    assert turn3.mode == "suffix" and turn3.message["input"] == [user("c")]
    again = turn3.remember([ASSISTANT], {}, "resp_3")
    turn4_items = [user("a"), done, ASSISTANT, user("b"), ASSISTANT, user("c"), ASSISTANT]
    assert plan_turn(again, body([*turn4_items, user("d")])).mode == "suffix"


def test_a_chain_by_id_keeps_the_alternates_for_a_later_full_request() -> None:
    memory, done, _ = reencrypted([user("a")])
    chained = plan_turn(memory, body([user("b")], previous_response_id="resp_1"))
    assert chained.mode == "passthrough"
    after = chained.remember([ASSISTANT], {}, "resp_2")
    full = [user("a"), done, ASSISTANT, user("b"), ASSISTANT, user("c")]
    assert plan_turn(after, body(full)).mode == "suffix"


def test_the_tail_digests_name_both_forms_of_the_last_item() -> None:
    done, final = reasoning_item("gAAA-streamed"), reasoning_item("gAAA-final")
    plan = plan_turn(None, body([user("a")]))
    memory = plan.remember([final], {0: done}, "resp_1")
    assert set(memory.tails()) == {digest_items([final]), digest_items([done])}
    assert plan_turn(None, body([])).remember([], {}, "r").tails() == ()
