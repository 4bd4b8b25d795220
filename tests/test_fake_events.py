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
