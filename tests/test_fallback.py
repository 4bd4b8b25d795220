"""The HTTP fallback: turns over `POST /responses` with SSE when WebSocket is refused or keeps
failing, for a cool-down, then WebSocket again. Real sockets; the fake serves both."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from tests.conftest import (
    AUTH,
    ProxyServer,
    held_proxy,
    post,
    request_body,
    sse_events,
    start_proxy,
    user,
    write_auth,
)
from trioproxy.fake import FakeUpstream, Reply
from trioproxy.logs import JsonFormatter
from trioproxy.sse import Decoder


def test_sse_decoder_handles_any_chunking() -> None:
    stream = (
        b': keep-alive\r\n\r\nevent: a\r\ndata: {"x": 1}\r\n\r\n'
        b"event: b\ndata: line one\ndata: line two\n\ndata: [DONE]\n\n"
    )
    whole = Decoder(1024).feed(stream)
    assert whole == ['{"x": 1}', "line one\nline two"]
    decoder = Decoder(1024)
    pieces = [decoder.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert [d for piece in pieces for d in piece] == whole
    with pytest.raises(ValueError):
        Decoder(8).feed(b"data: " + b"x" * 20)


async def test_an_upstream_without_websocket_is_served_over_http_for_the_cool_down(
    nursery: trio.Nursery, fake: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake.websocket_enabled = False
    server = await start_proxy(nursery, fake, fallback_cooldown=0.5)
    async with server.client() as client:
        streamed = await post(client, request_body([user("one")], stream=True))
        plain = await post(client, request_body([user("two")]))
        assert len(fake.handshakes) == 1  # refused once; the second turn did not even try
        fake.websocket_enabled = True
        await trio.sleep(0.6)  # the cool-down passes: WebSocket is tried again
        again = await post(client, request_body([user("three")]))
    assert streamed.status_code == plain.status_code == again.status_code == 200
    events = sse_events(streamed.text)
    assert [t for t, _ in events][-1] == "response.completed"
    assert plain.json()["output"][0]["content"][0]["text"] == "You said: two"
    assert len(fake.http_posts) == 2 and len(fake.creates()) == 1
    # The HTTP request is the client's body with stream on: full input, nothing chained.
    assert fake.http_posts[1].message["stream"] is True
    assert fake.http_posts[1].message["input"] == [user("two")]
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "trioproxy.turn"]
    assert [line["transport"] for line in lines] == ["http", "http", "websocket"]
    assert server.proxy.retries["websocket_refused"] == 1
    assert server.proxy.telemetry.transports == {"http": 2, "websocket": 1}


async def test_a_session_whose_sockets_keep_failing_moves_to_http(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, fallback_after=2)
    fake.queue(Reply.drop(after_events=3), Reply.drop(after_events=3))
    async with server.client() as client:
        for _ in range(2):  # each dies mid-stream: an error event for the client
            failed = await post(client, request_body([user("a")], stream=True))
            assert sse_events(failed.text)[-2][0] == "error"
        third = await post(client, request_body([user("a")], stream=True))
        other = await post(client, request_body([user("b")]), "another-session")
    assert sse_events(third.text)[-1][0] == "response.completed"
    assert len(fake.http_posts) == 1  # the failing session only
    assert other.status_code == 200 and len(fake.creates()) == 3  # others keep their socket


async def test_http_turn_failures_end_streams_the_same_way(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    fake.websocket_enabled = False
    server = await start_proxy(nursery, fake, read_timeout=0.3)
    fake.queue(
        Reply.drop(after_events=4),
        Reply.error("rate_limit_exceeded", 429),
        Reply("stall", after_events=2),
    )
    async with server.client() as client:
        dropped = await post(client, request_body([user("a")], stream=True))
        limited = await post(client, request_body([user("a")], stream=True))
        stalled = await post(client, request_body([user("a")], stream=True))
    assert [t for t, _ in sse_events(dropped.text)][-2:] == ["error", "response.failed"]
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    stalled_events = sse_events(stalled.text)
    assert stalled_events[-2][1]["code"] == "upstream_timeout"
    assert server.registry.tasks == 0


async def test_a_client_leaving_an_http_turn_cancels_it(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    fake.websocket_enabled = False
    server = await start_proxy(nursery, fake)
    async with server.client() as client:
        request = client.stream(
            "POST",
            "/responses",
            json=request_body([user("Take your time.\nfake: slow 0.2")], stream=True),
            headers={**AUTH, "session-id": "leaving"},
        )
        async with request as reply:
            async for line in reply.aiter_lines():
                if line.startswith("event: response.in_progress"):
                    break  # leave mid-stream
    with trio.fail_after(2):
        while server.registry.tasks:  # noqa: ASYNC110 (the registry's state)
            await trio.sleep(0.01)
    assert fake.events_sent < 10


async def test_fallback_can_be_turned_off(nursery: trio.Nursery, fake: FakeUpstream) -> None:
    fake.websocket_enabled = False
    server = await start_proxy(nursery, fake, http_fallback=False)
    async with server.client() as client:
        reply = await post(client, request_body([user("a")]))
    assert reply.status_code == 404 and fake.http_posts == []


async def test_chatgpt_turns_fall_back_with_their_credentials(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.websocket_enabled = False
    auth = write_auth(tmp_path / "auth.json", fake.logins.auth_json("acct-http"))
    server = await held_proxy(nursery, fake, auth)
    async with server.client() as client:
        reply = await client.post("/responses", json=request_body("hi"))
    assert reply.status_code == 200, reply.text
    seen = fake.http_requests[-1]
    assert seen.target == "/backend-api/codex/responses"
    assert seen.headers["chatgpt-account-id"] == "acct-http"
    assert fake.http_posts[0].message["store"] is False


async def test_health_and_metrics_name_the_transport(server: ProxyServer) -> None:
    server.fake.websocket_enabled = False
    async with server.client() as client:
        await post(client, request_body([user("a")]))
        metrics = (await client.get(server.base_url.removesuffix("/v1") + "/metrics")).text
    assert 'trioproxy_turn_transport_total{transport="http"} 1.0' in metrics


async def test_one_credentials_refused_upgrade_never_moves_another_to_http(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """The cool-down is keyed by credential group: one key's 400 on the upgrade (its own bad
    header, a key without WebSocket access) leaves every other tenant on WebSocket."""
    server = await start_proxy(nursery, fake)
    fake.refuse_handshakes(400, "websocket_not_allowed")
    async with server.client() as client:
        refused = await post(client, request_body([user("a")]), authorization="Bearer sk-one")
        other = await post(client, request_body([user("b")]), authorization="Bearer sk-two")
        again = await post(client, request_body([user("c")]), authorization="Bearer sk-one")
    assert refused.status_code == other.status_code == again.status_code == 200
    assert [p.message["input"][0]["content"][0]["text"] for p in fake.http_posts] == ["a", "c"]
    assert len(fake.creates()) == 1 and fake.handshakes[-1]["authorization"] == "Bearer sk-two"
