"""The fake upstream behaves like OpenAI's WebSocket mode where the proxy depends on it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from trioproxy.fake import FakeUpstream, Reply

AUTH = [(b"authorization", b"Bearer sk-test")]


async def events_until_end(ws: WebSocketConnection) -> list[dict[str, Any]]:
    out = []
    while True:
        event = json.loads(await ws.get_message())
        out.append(event)
        if event["type"] in (
            "response.completed",
            "response.failed",
            "error",
            "response.incomplete",
        ):
            return out


def create(input_value: Any, **extra: Any) -> str:
    return json.dumps({"type": "response.create", "model": "m", "input": input_value, **extra})


async def test_store_false_responses_live_only_on_their_socket(fake: FakeUpstream) -> None:
    async with open_websocket_url(fake.url, extra_headers=AUTH) as ws:
        await ws.send_message(create("hi", store=False))
        rid = (await events_until_end(ws))[-1]["response"]["id"]
        await ws.send_message(create("more", store=False, previous_response_id=rid))
        chained = await events_until_end(ws)
        assert chained[-1]["type"] == "response.completed"
        assert chained[-1]["response"]["usage"]["input_tokens_details"]["cached_tokens"] > 0
    async with open_websocket_url(fake.url, extra_headers=AUTH) as other:
        await other.send_message(create("more", store=False, previous_response_id=rid))
        error = (await events_until_end(other))[-1]
    assert error["type"] == "error" and error["status"] == 400
    assert error["error"]["code"] == "previous_response_not_found"


async def test_one_response_in_flight_per_socket(fake: FakeUpstream) -> None:
    fake.event_delay = 0.01
    async with open_websocket_url(fake.url, extra_headers=AUTH) as ws:
        await ws.send_message(create("a long enough answer to stream for a while"))
        await ws.send_message(create("second"))
        seen = []
        while not any(e["type"] == "response.completed" for e in seen):
            seen.append(json.loads(await ws.get_message()))
    errors = [e for e in seen if e["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["response_already_in_flight"]


async def test_handshake_without_bearer_is_refused(fake: FakeUpstream) -> None:
    with pytest.raises(ConnectionRejected) as caught:
        async with open_websocket_url(fake.url):
            pass
    assert caught.value.status_code == 401


async def test_scripted_tool_call_and_records(fake: FakeUpstream) -> None:
    fake.queue(Reply.call("exec_command", {"cmd": "ls"}))
    async with open_websocket_url(fake.url, extra_headers=AUTH) as ws:
        await ws.send_message(create("go"))
        events = await events_until_end(ws)
    item = events[-1]["response"]["output"][0]
    assert item["type"] == "function_call" and json.loads(item["arguments"]) == {"cmd": "ls"}
    assert "response.function_call_arguments.delta" in [e["type"] for e in events]
    assert fake.received[0].message["input"] == "go" and fake.received[0].size > 0
    assert fake.handshakes[0]["authorization"] == "Bearer sk-test"
