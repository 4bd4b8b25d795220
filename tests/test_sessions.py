"""Real sockets end to end: HTTP client -> proxy under hypercorn -> fake upstream over WebSocket."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from tests.conftest import (
    AUTH,
    ProxyServer,
    post,
    request_body,
    sse_events,
    start_proxy,
    user,
    wait_until,
)
from trioproxy.fake import FakeUpstream, Reply


def output_of(response: dict[str, Any]) -> list[Any]:
    return list(response["output"])


async def three_turns(server: ProxyServer, session: str = "s1") -> list[dict[str, Any]]:
    """A client that echoes each response's output back, as Codex and SDK users do."""
    history: list[Any] = []
    responses = []
    async with server.client() as client:
        for text in ("first", "second", "third"):
            history.append(user(text))
            reply = await post(
                client, request_body(history, tools=[{"type": "function", "name": "f"}]), session
            )
            assert reply.status_code == 200, reply.text
            responses.append(reply.json())
            history.extend(output_of(reply.json()))
    return responses


async def test_three_turn_session_uses_one_socket_and_suffixes(server: ProxyServer) -> None:
    fake = server.fake
    responses = await three_turns(server)
    creates = fake.creates()
    assert fake.sockets_opened == 1
    assert [r.socket for r in creates] == [1, 1, 1]
    first, second, third = (r.message for r in creates)
    assert "previous_response_id" not in first and len(first["input"]) == 1
    assert second["previous_response_id"] == responses[0]["id"]
    assert second["input"] == [user("second")]
    assert third["previous_response_id"] == responses[1]["id"]
    assert third["input"] == [user("third")]
    assert all(
        "stream" not in m and m["tools"] == [{"type": "function", "name": "f"}]
        for m in (first, second, third)
    )
    assert creates[2].size < creates[0].size + 200  # the suffix does not grow with history
    assert server.proxy.turns["suffix"] == 2 and server.proxy.turns["full"] == 1
    assert responses[2]["usage"]["input_tokens_details"]["cached_tokens"] > 0
    assert server.registry.pooled == 1 and server.registry.idle == 1


async def test_streaming_relays_every_event_in_order(server: ProxyServer) -> None:
    async with server.client() as client:
        body = request_body([user("stream me please, several words long")], stream=True)
        reply = await post(client, body)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    types = [t for t, _ in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(d["type"] == t for t, d in events)


async def test_stream_is_flushed_as_it_arrives(nursery: trio.Nursery) -> None:
    """The first event reaches the client while the upstream is still generating."""
    fake = FakeUpstream(event_delay=0.2)
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake)
    async with server.client() as client:
        body = request_body([user("a b c d e f g h i j k l m n o p")], stream=True)
        async with client.stream(
            "POST", "/responses", json=body, headers={**AUTH, "session-id": "s"}
        ) as reply:
            lines = reply.aiter_lines()
            first = await lines.__anext__()
            assert first == "event: response.created"
            # The client holds the first event while the upstream has sent only the first
            # one or two of the turn's ~14: nothing waited for the whole turn.
            assert fake.events_sent <= 2
            rest = [line async for line in lines]
    assert "event: response.completed" in rest
    assert fake.events_sent > 10


async def test_two_sessions_use_two_sockets(server: ProxyServer) -> None:
    async with server.client() as client:
        for session in ("a", "b", "a", "b"):
            reply = await post(client, request_body([user("hi")]), session)
            assert reply.status_code == 200
    assert server.fake.sockets_opened == 2
    assert server.registry.pooled == 2


async def test_requests_without_a_session_reuse_a_warm_socket(server: ProxyServer) -> None:
    """No session header, no cache key, unrelated inputs: one socket, kept warm, each turn
    in full (tests/test_affinity.py covers conversations recognised by their content)."""
    async with server.client() as client:
        for _ in range(3):
            reply = await post(client, request_body([user("hi")]), session=None)
            assert reply.status_code == 200
    assert server.fake.sockets_opened == 1
    assert server.registry.pooled == 1 and server.registry.idle == 1
    assert server.proxy.turns == {"full": 3}
    assert server.proxy.placements == {"new": 1, "warm": 2}


async def test_concurrent_turns_on_one_session_never_share_a_socket(nursery: trio.Nursery) -> None:
    fake = FakeUpstream(event_delay=0.02)
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake)
    results: list[int] = []

    async def one(text: str) -> None:
        async with server.client() as client:
            reply = await post(client, request_body([user(text)]), "same")
            results.append(reply.status_code)

    async with trio.open_nursery() as inner:
        for i in range(3):
            inner.start_soon(one, f"turn {i}")
    assert results == [200, 200, 200]
    assert fake.sockets_opened == 3
    assert {r.socket for r in fake.creates()} == {1, 2, 3}
    assert all("previous_response_id" not in r.message for r in fake.creates())
    assert server.registry.pooled == 1  # the session keeps one; the others were one-turn


async def test_pool_cap_closes_the_least_recently_used_idle_socket(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, max_sockets=2)
    async with server.client() as client:
        for session in ("a", "b", "a", "c"):  # "b" is least recently used when "c" arrives
            assert (await post(client, request_body([user("x")]), session)).status_code == 200
        assert server.registry.pooled == 2
        assert server.registry.evictions["lru"] == 1
        await fake.wait_open_sockets(2)
        # "a" survived: its next turn reuses socket 1; "b" comes back on a new socket.
        assert (await post(client, request_body([user("x")]), "a")).status_code == 200
        assert fake.creates()[-1].socket == 1
        assert (await post(client, request_body([user("x")]), "b")).status_code == 200
        assert fake.creates()[-1].socket == 4


async def test_at_the_cap_with_every_socket_busy_a_turn_gets_a_one_turn_socket(
    nursery: trio.Nursery,
) -> None:
    fake = FakeUpstream(event_delay=0.05)
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake, max_sockets=1)
    codes: list[int] = []

    async def one(session: str) -> None:
        async with server.client() as client:
            codes.append((await post(client, request_body([user("x y z")]), session)).status_code)

    async with trio.open_nursery() as inner:
        inner.start_soon(one, "a")
        await wait_until(lambda: fake.open_sockets == 1)
        inner.start_soon(one, "b")
    assert codes == [200, 200]
    assert server.registry.pooled == 1 and server.proxy.turns["one_turn"] == 1


async def test_failed_and_incomplete_come_back_as_response_objects(server: ProxyServer) -> None:
    server.fake.queue(Reply("fail", code="server_error"), Reply("incomplete"))
    async with server.client() as client:
        failed = await post(client, request_body([user("a")]))
        incomplete = await post(client, request_body([user("a")]))
    assert failed.status_code == 200 and failed.json()["status"] == "failed"
    assert incomplete.status_code == 200 and incomplete.json()["status"] == "incomplete"
    evictions = server.registry.evictions
    assert evictions["failed"] == 1 and evictions["incomplete"] == 1  # neither keeps its socket


async def test_client_previous_response_id_is_passed_through(server: ProxyServer) -> None:
    fake = server.fake
    async with server.client() as client:
        first = (await post(client, request_body([user("a")]))).json()
        same = await post(client, request_body([user("b")], previous_response_id=first["id"]))
        assert same.status_code == 200
        other = await post(client, request_body([user("c")], previous_response_id="resp_elsewhere"))
    creates = fake.creates()
    assert creates[1].socket == 1 and creates[1].message["previous_response_id"] == first["id"]
    assert creates[1].message["input"] == [user("b")]
    assert creates[2].socket == 2, "an id this socket did not make goes to a fresh socket"
    assert creates[2].message["previous_response_id"] == "resp_elsewhere"
    assert other.status_code == 400  # store=true is the default; this id was never made
    assert other.json()["error"]["code"] == "previous_response_not_found"


async def test_bad_input_gets_openai_errors_and_nothing_goes_upstream(server: ProxyServer) -> None:
    async with server.client() as client:
        no_auth = await client.post("/responses", json=request_body("x"))
        assert no_auth.status_code == 401
        assert no_auth.json()["error"]["code"] == "missing_api_key"
        bad_json = await client.post("/responses", content=b"{oops", headers=AUTH)
        assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
        not_object = await client.post("/responses", json=[1], headers=AUTH)
        assert not_object.status_code == 400
        no_model = await client.post("/responses", json={"input": "x"}, headers=AUTH)
        assert no_model.json()["error"]["param"] == "model"
        bad_input = await client.post("/responses", json={"model": "m", "input": 3}, headers=AUTH)
        assert bad_input.json()["error"]["param"] == "input"
        missing = await client.get("/nowhere")
        assert missing.status_code == 404 and "error" in missing.json()
        wrong_method = await client.get("/responses")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        form = await client.post(
            "/responses",
            content=b"model=m&input=x",
            headers={**AUTH, "content-type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 415
        assert form.json()["error"]["code"] == "unsupported_media_type"
        long_session = await post(client, request_body("x"), "s" * 257)
        assert long_session.status_code == 400
        assert long_session.json()["error"]["code"] == "invalid_session_id"
    assert server.fake.sockets_opened == 0 and server.fake.received == []


async def test_health_check_reports_the_pool_and_the_turns(server: ProxyServer) -> None:
    await three_turns(server)
    async with httpx.AsyncClient(base_url=server.base_url.removesuffix("/v1")) as client:
        health = (await client.get("/healthz")).json()
    assert health["status"] == "ok" and health["pooled"] == 1 and health["opened"] == 1
    assert health["turns"] == {"full": 1, "suffix": 2}
    assert health["upstream_bytes"] == sum(r.size for r in server.fake.creates())


async def test_handshake_carries_auth_beta_and_session_headers(server: ProxyServer) -> None:
    async with server.client() as client:
        await post(
            client,
            request_body("x"),
            "sess-9",
            originator="codex_exec",
            **{"x-client-request-id": "r1"},
        )
    headers = server.fake.handshakes[0]
    assert headers["authorization"] == AUTH["authorization"]
    assert headers["openai-beta"] == "responses_websockets=2026-02-06"
    assert headers["session-id"] == "sess-9" and headers["originator"] == "codex_exec"


async def test_oversized_body_is_a_413_in_openai_shape(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, max_body_bytes=1000)
    async with server.client() as client:
        reply = await post(client, request_body([user("x" * 2000)]))
    assert reply.status_code == 413
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert fake.received == []


async def test_prompt_cache_key_and_client_item_ids_go_upstream_untouched(
    server: ProxyServer,
) -> None:
    first_item = {**user("one"), "id": "msg_client_1"}
    second_item = {**user("two"), "id": "msg_client_2"}
    extra = {"prompt_cache_key": "pck-session-1", "store": False}
    async with server.client() as client:
        first = await post(client, request_body([first_item], **extra))
        output = first.json()["output"]
        history = [first_item, *output, second_item]
        second = await post(client, request_body(history, **extra))
    assert second.status_code == 200, second.text
    one, two = (c.message for c in server.fake.creates())
    assert one["input"] == [first_item] and two["input"] == [second_item]  # ids kept
    assert one["prompt_cache_key"] == two["prompt_cache_key"] == "pck-session-1"
    assert two["previous_response_id"] == first.json()["id"]
