"""The fake upstream's events are the SDK's events: every one validates against its types."""

from __future__ import annotations

import typing

import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from trioproxy.fake.events import response_events
from trioproxy.fake.script import Reply, decide

ADAPTER: pydantic.TypeAdapter[ResponseStreamEvent] = pydantic.TypeAdapter(ResponseStreamEvent)
# The SDK's own classes by event type, so a failure names the one class that refused the event.
BY_TYPE = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}
REQUEST = {
    "model": "gpt-test",
    "input": "hi",
    "tools": [
        {
            "type": "function",
            "name": "f",
            "parameters": {"type": "object", "properties": {}},
            "strict": False,
        }
    ],
}


@pytest.mark.parametrize(
    "reply",
    [
        Reply.message("one two three four five six seven"),
        Reply.call("f", {"cmd": "ls -la"}),
        Reply("fail", code="server_error"),
        Reply("incomplete"),
    ],
    ids=["text", "call", "fail", "incomplete"],
)
def test_every_event_parses_with_the_sdk(reply: Reply) -> None:
    events, _ = response_events("resp_1", REQUEST, reply, input_bytes=100, cached_bytes=40)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        BY_TYPE[event["type"]].model_validate(event)
        parsed = ADAPTER.validate_python(event)
        assert parsed.type == event["type"]
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in ("response.completed", "response.failed", "response.incomplete")


def test_completed_carries_usage_with_cached_tokens() -> None:
    events, output = response_events(
        "resp_1", REQUEST, Reply.message("x"), input_bytes=4000, cached_bytes=2000
    )
    usage = events[-1]["response"]["usage"]
    assert usage["input_tokens"] == 1000
    assert usage["input_tokens_details"]["cached_tokens"] == 500
    assert events[-1]["response"]["output"] == output


def test_script_follows_the_conversation() -> None:
    assert decide([{"role": "user", "content": "hello"}]).text == "You said: hello"
    call = decide([{"role": "user", "content": 'do it\nfake: call exec_command {"cmd": "ls"}'}])
    assert (call.kind, call.name, call.arguments) == ("call", "exec_command", '{"cmd": "ls"}')
    after = decide(
        [
            {"role": "user", "content": "x"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
        ]
    )
    assert after.text == "The tool returned: 42"
    assert decide(
        [{"role": "user", "content": "fake: error rate_limit_exceeded 429"}]
    ) == Reply.error("rate_limit_exceeded", 429)
    assert decide([{"role": "user", "content": "fake: drop 3"}]) == Reply.drop(3)


REASONING_REQUEST = {**REQUEST, "model": "gpt-5", "include": ["reasoning.encrypted_content"]}


@pytest.mark.parametrize(
    "reply", [Reply.message("one two three"), Reply.call("f", {"cmd": "ls"})], ids=["text", "call"]
)
def test_a_reasoning_model_answers_as_the_live_api_does(reply: Reply) -> None:
    """Reasoning item first, announced without ciphertext, summary streamed, one ciphertext
    in `output_item.done` and another for the same item in `response.completed`; every event
    still one of the SDK's."""
    events, output = response_events(
        "resp_1", REASONING_REQUEST, reply, input_bytes=100, cached_bytes=0
    )
    for event in events:
        BY_TYPE[event["type"]].model_validate(event)
    types = [e["type"] for e in events]
    assert types[2:4] == ["response.output_item.added", "response.reasoning_summary_part.added"]
    assert "response.reasoning_summary_text.delta" in types
    added = events[2]["item"]
    assert added["type"] == "reasoning" and added["encrypted_content"] is None
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [d["type"] for d in done] == ["reasoning", output[1]["type"]]
    final = events[-1]["response"]["output"]
    assert final == output and final[0]["id"] == done[0]["id"]
    assert done[0]["encrypted_content"].startswith("gAAAA")
    assert final[0]["encrypted_content"].startswith("gAAAA")
    assert final[0]["encrypted_content"] != done[0]["encrypted_content"]
    assert final[1] == done[1]  # only the reasoning item changes
    if reply.kind == "text":
        assert final[1]["phase"] == "final_answer"
    assert events[-1]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


def test_ciphertext_only_when_include_asks_and_reencryption_can_be_turned_off() -> None:
    plain = {**REQUEST, "model": "gpt-5"}
    _, output = response_events("r", plain, Reply.message("x"), input_bytes=1, cached_bytes=0)
    assert output[0]["type"] == "reasoning" and output[0]["encrypted_content"] is None
    events, output = response_events(
        "r", REASONING_REQUEST, Reply.message("x"), input_bytes=1, cached_bytes=0, reencrypt=False
    )
    done = next(e["item"] for e in events if e["type"] == "response.output_item.done")
    assert done == output[0] and done["encrypted_content"]


@pytest.mark.parametrize(
    ("request_extra", "reasoning"),
    [
        ({"model": "gpt-5"}, True),
        ({"model": "gpt-5.1-codex-max"}, True),
        ({"model": "gpt-6.1-sol"}, True),  # Codex 0.169.0's default
        ({"model": "o3"}, True),
        ({"model": "o4-mini"}, True),
        ({"model": "gpt-test", "reasoning": {"effort": "low"}}, True),
        ({"model": "gpt-test"}, False),
        ({"model": "gpt-4.1"}, False),
        ({"model": "omni-moderation"}, False),
    ],
)
def test_which_requests_get_a_reasoning_item(
    request_extra: dict[str, object], reasoning: bool
) -> None:
    _, output = response_events(
        "r", {**REQUEST, **request_extra}, Reply.message("x"), input_bytes=1, cached_bytes=0
    )
    assert (output[0]["type"] == "reasoning") is reasoning
