"""Clients that speak the Responses WebSocket protocol themselves, through the proxy.

The `openai` SDK's `client.responses.connect()` opens `ws://{base_url}/responses`; each
`response.create` it sends is a turn on the session's pooled upstream socket, and the events
come back as frames, byte for byte. The client's socket is not the upstream's: reconnecting
with the same session continues the chain on the same upstream socket.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from openai import OpenAI
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.conftest import ProxyServer, nothing_left, wait_until
from trioproxy.fake import FakeUpstream

REASONING = {"model": "gpt-5", "store": False, "include": ["reasoning.encrypted_content"]}


def sdk(server: ProxyServer, key: str = "sk-test-key") -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=30)


def turn(connection: Any, **create: Any) -> tuple[list[str], Any]:
    """Send one `response.create`; the event types until its terminal event, and that event."""
    connection.response.create(**create)
    types = []
    for event in connection:
        types.append(event.type)
        if event.type in ("response.completed", "response.failed", "error"):
            return types, event
    raise AssertionError("the connection ended before the response did")


async def test_sdk_connect_warm_up_and_three_chained_turns_on_one_upstream_socket(
    server: ProxyServer,
) -> None:
    def run() -> list[Any]:
        ends = []
        headers = {"session-id": "ws-session"}
        with sdk(server).responses.connect(extra_headers=headers) as connection:
            _, warm = turn(connection, input=[], generate=False, **REASONING)
            ends.append(warm)
            previous = warm.response.id
            for word in ("one", "two", "three"):
                types, end = turn(
                    connection, input=word, previous_response_id=previous, **REASONING
                )
                assert types[0] == "response.created" and "response.output_text.delta" in types
                ends.append(end)
                previous = end.response.id
        return ends

    ends = await trio.to_thread.run_sync(run)
    assert all(end.type == "response.completed" for end in ends)
    fake = server.fake
    creates = fake.creates()
    assert fake.sockets_opened == 1 and len(creates) == 4
    assert creates[0].message.get("generate") is False
    assert [c.message.get("previous_response_id") for c in creates[1:]] == [
        e.response.id for e in ends[:3]
    ]
    assert ends[-1].response.output[-1].content[0].text == "You said: three"
    assert server.proxy.telemetry.clients == {"websocket-in": 4}
    await nothing_left(server)


async def test_a_client_that_reconnects_continues_its_chain_on_the_same_upstream_socket(
    server: ProxyServer,
) -> None:
    def run() -> tuple[str, Any]:
        headers = {"session-id": "reconnecting"}
        with sdk(server).responses.connect(extra_headers=headers) as connection:
            _, first = turn(connection, input="before", **REASONING)
        with sdk(server).responses.connect(extra_headers=headers) as connection:
            _, second = turn(
                connection, input="after", previous_response_id=first.response.id, **REASONING
            )
        return first.response.id, second

    first_id, second = await trio.to_thread.run_sync(run)
    assert second.type == "response.completed"
    fake = server.fake
    assert fake.sockets_opened == 1
    assert fake.creates()[1].message["previous_response_id"] == first_id
    assert server.registry.pooled == 1  # the upstream socket outlived both client sockets


async def test_a_full_resend_over_a_client_websocket_goes_as_a_suffix(server: ProxyServer) -> None:
    def run() -> None:
        headers = {"session-id": "resend"}
        with sdk(server).responses.connect(extra_headers=headers) as connection:
            history: list[Any] = [{"role": "user", "content": "one"}]
            _, first = turn(connection, input=history, **REASONING)
            history += [i.model_dump(exclude_none=True) for i in first.response.output]
            history.append({"role": "user", "content": "two"})
            turn(connection, input=history, **REASONING)

    await trio.to_thread.run_sync(run)
    second = server.fake.creates()[1].message
    assert second["input"] == [{"role": "user", "content": "two"}]
    assert second["previous_response_id"]
    assert server.proxy.turns == {"full": 1, "suffix": 1}


async def test_errors_keep_the_client_socket_open(server: ProxyServer) -> None:
    """An upstream error before the response is relayed as the nested `error` event; a bad
    message gets one too; the socket stays open for the next turn."""

    def run() -> list[Any]:
        seen = []
        with sdk(server).responses.connect(extra_headers={"session-id": "e"}) as connection:
            _, error = turn(connection, model="m", input="fake: error rate_limit_exceeded 429")
            seen.append(error)
            connection.send({"type": "response.create", "input": "no model"})  # type: ignore[typeddict-item]
            seen.append(next(iter(connection)))
            connection.send(
                {"type": "response.create", "model": "m", "input": "x", "stream_id": "a lane!"}
            )  # type: ignore[typeddict-unknown-key]
            seen.append(next(iter(connection)))
            _, fine = turn(connection, model="m", input="still here")
            seen.append(fine)
        return seen

    upstream, invalid, lane, fine = await trio.to_thread.run_sync(run)
    assert upstream.type == "error" and upstream.error.code == "rate_limit_exceeded"
    assert invalid.type == "error" and invalid.error.code == "missing_required_parameter"
    assert lane.type == "error" and lane.error.code == "invalid_stream_id"
    assert lane.stream_id == "a lane!"  # errors echo the lane they concern
    assert fine.type == "response.completed"
    await nothing_left(server)


async def test_a_client_socket_closed_mid_response_cancels_it_and_evicts_the_socket(
    server: ProxyServer,
) -> None:
    def run() -> None:
        with sdk(server).responses.connect(extra_headers={"session-id": "cut"}) as connection:
            connection.response.create(model="m", input="fake: slow 0.2\nfake: long 60")
            for event in connection:
                if event.type == "response.output_text.delta":
                    return  # leaving the block closes the client socket mid-response

    await trio.to_thread.run_sync(run)
    await wait_until(lambda: server.registry.evictions["abandoned"] == 1)
    await nothing_left(server)
    assert server.registry.live == 0


async def test_a_wrong_key_gets_an_error_event_and_a_policy_close(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    from tests.test_managed import gateway_for

    gateway = await gateway_for(nursery, fake, tmp_path)
    url = gateway.base_url.replace("http://", "ws://") + "/responses"
    async with open_websocket_url(url, extra_headers=[("authorization", "Bearer wrong")]) as ws:
        event = json.loads(await ws.get_message())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
    assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
    assert closed.value.reason.code == 1008
    assert fake.received == [] and fake.sockets_opened == 0


async def test_two_scopes_with_one_session_id_never_share_an_upstream_socket(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    from tests.test_managed import KEY_A, KEY_B, gateway_for

    gateway = await gateway_for(nursery, fake, tmp_path)
    url = gateway.base_url.replace("http://", "ws://") + "/responses"
    ids = {}
    for key in (KEY_A, KEY_B):
        headers = [("authorization", f"Bearer {key}"), ("session-id", "same")]
        async with open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(
                json.dumps({"type": "response.create", "model": "m", "input": "x"})
            )
            while (event := json.loads(await ws.get_message()))["type"] != "response.completed":
                pass
            ids[key] = event["response"]["id"]
    # B chains from A's response: refused as not found, nothing sent upstream.
    headers = [("authorization", f"Bearer {KEY_B}"), ("session-id", "same")]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        stolen = {"type": "response.create", "model": "m", "input": "y"}
        await ws.send_message(json.dumps({**stolen, "previous_response_id": ids[KEY_A]}))
        refused = json.loads(await ws.get_message())
    assert refused["type"] == "error" and refused["error"]["code"] == "previous_response_not_found"
    assert fake.sockets_opened == 2 and len(fake.creates()) == 2


async def test_an_upstream_that_drops_mid_response_ends_it_with_a_clear_error(
    server: ProxyServer,
) -> None:
    url = server.base_url.replace("http://", "ws://") + "/responses"
    headers = [("authorization", "Bearer sk-test-key"), ("session-id", "drop")]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        await ws.send_message(
            json.dumps({"type": "response.create", "model": "m", "input": "fake: drop 4"})
        )
        events = []
        while (event := json.loads(await ws.get_message()))["type"] != "error":
            events.append(event["type"])
        assert events[0] == "response.created"
        assert event["error"]["code"] == "upstream_connection_closed"
        # The client socket stays open: the next turn runs on a fresh upstream socket.
        await ws.send_message(json.dumps({"type": "response.create", "model": "m", "input": "x"}))
        while (event := json.loads(await ws.get_message()))["type"] != "response.completed":
            pass
    assert server.fake.sockets_opened == 2
    await nothing_left(server)


async def test_an_idle_client_socket_is_closed_and_an_oversized_message_refused(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    from tests.conftest import start_proxy

    server = await start_proxy(nursery, fake, websocket_idle_timeout=0.3, max_body_bytes=50_000)
    url = server.base_url.replace("http://", "ws://") + "/responses"
    headers = [("authorization", "Bearer sk-test-key")]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        with pytest.raises(ConnectionClosed) as idle:
            await ws.get_message()
    assert idle.value.reason.code == 1000
    async with open_websocket_url(url, extra_headers=headers) as ws:
        huge = {"type": "response.create", "model": "m", "input": "x" * 60_000}
        await ws.send_message(json.dumps(huge))
        with pytest.raises(ConnectionClosed) as too_big:
            await ws.get_message()
    assert too_big.value.reason.code == 1009
    assert fake.received == []


async def test_a_large_websocket_message_is_parsed_like_a_large_http_body(
    server: ProxyServer,
) -> None:
    """The same stepwise parse as POST bodies (bigjson): a lone surrogate past the threshold is
    a clear error event, and a valid large message runs as a turn."""
    from trioproxy import bigjson

    url = server.base_url.replace("http://", "ws://") + "/responses"
    pad = " " * (bigjson.STEPWISE_BYTES + 1)
    async with open_websocket_url(
        url, extra_headers=[("authorization", "Bearer sk-test-key")], max_message_size=2**25
    ) as ws:
        bad = '{"type": "response.create", "model": "m", "input": "\\ud800"}' + pad
        await ws.send_message(bad)
        refused = json.loads(await ws.get_message())
        good = json.dumps({"type": "response.create", "model": "m", "input": "big"}) + pad
        await ws.send_message(good)
        while json.loads(await ws.get_message())["type"] != "response.completed":
            pass
    assert refused["type"] == "error" and refused["error"]["code"] == "invalid_json"


async def test_messages_sent_during_a_turn_run_in_order_and_are_bounded(
    server: ProxyServer,
) -> None:
    """A second `response.create` sent while the first runs is taken after it (FIFO, as the
    default lane is); a client that keeps sending is closed (1008), not buffered without end."""
    url = server.base_url.replace("http://", "ws://") + "/responses"
    headers = [("authorization", "Bearer sk-test-key"), ("session-id", "fifo")]

    def create(text: str) -> str:
        return json.dumps({"type": "response.create", "model": "m", "input": text})

    async with open_websocket_url(url, extra_headers=headers) as ws:
        await ws.send_message(create("first\nfake: slow 0.05"))
        await ws.send_message(create("second"))
        done = []
        while len(done) < 2:
            event = json.loads(await ws.get_message())
            if event["type"] == "response.completed":
                done.append(event["response"]["output"][0]["content"][0]["text"])
    assert done[0].startswith("You said: first") and done[1] == "You said: second"
    async with open_websocket_url(url, extra_headers=headers) as ws:
        with pytest.raises(ConnectionClosed) as closed:  # while sending or reading after
            await ws.send_message(create("slow\nfake: slow 0.2"))
            for n in range(40):
                await ws.send_message(create(f"flood {n}"))
            while True:
                await ws.get_message()
    assert closed.value.reason.code == 1008
    await wait_until(lambda: server.registry.busy == 0)


async def test_client_websockets_are_offered_permessage_deflate(server: ProxyServer) -> None:
    """Codex and the SDK offer permessage-deflate; the proxy (hypercorn) accepts it."""
    from trioproxy.wsclient import open_websocket

    url = server.base_url.replace("http://", "ws://") + "/responses"
    auth = [(b"authorization", b"Bearer sk-test-key")]
    async with open_websocket(
        url, auth, deflate=True, connect_timeout=5, close_timeout=1, max_message_size=2**24
    ) as sock:
        assert sock.deflate
        await sock.send_text(
            json.dumps({"type": "response.create", "model": "m", "input": "z"}).encode()
        )
        while json.loads(await sock.receive())["type"] != "response.completed":
            pass
