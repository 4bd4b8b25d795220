"""The fake upstream behaves like OpenAI's WebSocket mode where the proxy depends on it."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import httpx
import pytest
import trio
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
    fake.queue_creates = False  # the refusal of a fake without lanes (they queue, FIFO)
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


async def test_a_client_resetting_mid_stream_does_not_take_the_server_down(
    fake: FakeUpstream,
) -> None:
    """A gateway cut short closes its upstream connections with the answer half sent (the
    bench saw LiteLLM do it); the fake must drop that connection only and keep serving."""
    body = json.dumps(
        {"model": "m", "stream": True, "input": "fake: slow 0.05\nfake: deltas 40"}
    ).encode()
    request = (
        b"POST /v1/responses HTTP/1.1\r\nhost: fake\r\nauthorization: Bearer sk-test\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    stream = await trio.open_tcp_stream("127.0.0.1", fake.port)
    await stream.send_all(request)
    received = b""
    while b"event: response.created" not in received:
        received += await stream.receive_some(65536)
    # Reset, not a clean close: the fake's next write fails with ECONNRESET.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
    with trio.fail_after(5):
        await fake.wait_http_dropped(1)
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"http://127.0.0.1:{fake.port}/v1/responses",
            json={"model": "m", "input": "hi"},
            headers={"authorization": "Bearer sk-test"},
        )
    assert reply.status_code == 200 and "response.completed" in reply.text
