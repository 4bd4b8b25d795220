"""WebSocket clients that use lanes (`stream_id`), steering and events the proxy does not know.

A client's lanes run at once as lanes of one upstream socket (so a lane can fork from another's
response), each lane first-in first-out, their events interleaved on the client's socket and
each lane's events echoing its `stream_id`. Steering reaches the socket its target runs on; the
turn stays open until the upstream's successor response commits it. A client that stops reading
stops the upstream's reading, with a bounded amount held in between.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from openai import AsyncOpenAI
from openai.lib.responses_websocket import (
    AsyncResponsesWebSocketSession,
    ResponsesWebSocketLimits,
)
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.conftest import ProxyServer, nothing_left, start_proxy, wait_until
from trioproxy import awaiting
from trioproxy.fake import FakeUpstream
from trioproxy.fake.script import Reply

LIMITS = ResponsesWebSocketLimits(
    max_lanes=4,
    max_events_per_lane=4096,
    max_events=8192,
    max_bytes_per_lane=1 << 24,
    max_bytes=1 << 25,
)
TERMINALS = ("response.completed", "response.failed", "response.incomplete", "error")


def ws_url(server: ProxyServer) -> str:
    return server.base_url.replace("http://", "ws://") + "/responses"


def session(name: str) -> list[tuple[str, str]]:
    return [("authorization", "Bearer sk-test-key"), ("session-id", name)]


async def send(ws: WebSocketConnection, **message: Any) -> None:
    await ws.send_message(json.dumps(message))


async def until(ws: WebSocketConnection, done: Any) -> list[dict[str, Any]]:
    """Events until `done(event)` is true (that one included)."""
    events = []
    with trio.fail_after(10):
        while True:
            event = json.loads(await ws.get_message())
            events.append(event)
            if done(event):
                return events


def terminal_of(lane: str | None) -> Any:
    return lambda e: e["type"] in TERMINALS and e.get("stream_id") == lane


async def test_two_sdk_lanes_run_at_once_on_one_upstream_socket(server: ProxyServer) -> None:
    """`openai.lib.responses_websocket`: two named lanes, concurrently, each collecting its
    own final response; one upstream socket carries both."""
    client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test-key", max_retries=0)

    async def run() -> tuple[Any, Any]:
        async with (
            client.responses.connect(extra_headers={"session-id": "lanes"}) as connection,
            AsyncResponsesWebSocketSession(connection, limits=LIMITS) as session,
        ):
            a, b = session.lane("a"), session.lane("b")
            await a.send({"type": "response.create", "model": "m", "input": "fake: slow 0.02\nA"})
            await b.send({"type": "response.create", "model": "m", "input": "fake: slow 0.02\nB"})
            first, second = await a.get_final_response(), await b.get_final_response()
            # A fork: lane b continues lane a's response on the same connection.
            await b.send(
                {
                    "type": "response.create",
                    "model": "m",
                    "input": "fork",
                    "previous_response_id": first.id,
                }
            )
            forked = await b.get_final_response()
            return (first, second), forked

    import asyncio  # the SDK's session is asyncio code: run it in a thread of its own

    (first, second), forked = await trio.to_thread.run_sync(lambda: asyncio.run(run()))
    assert first.status == second.status == forked.status == "completed"
    assert first.output[-1].content[0].text.endswith("A")
    assert second.output[-1].content[0].text.endswith("B")
    fake = server.fake
    assert fake.sockets_opened == 1
    creates = fake.creates()
    assert [c.message.get("stream_id") for c in creates] == ["a", "b", "b"]
    assert creates[2].message["previous_response_id"] == first.id
    assert server.proxy.placements["lane"] >= 1
    await nothing_left(server)


async def test_lanes_interleave_and_each_lane_is_first_in_first_out(server: ProxyServer) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("fifo")) as ws:
        await send(
            ws, type="response.create", model="m", input="fake: slow 0.01\none", stream_id="x"
        )
        await send(
            ws, type="response.create", model="m", input="fake: slow 0.01\ntwo", stream_id="x"
        )
        await send(
            ws, type="response.create", model="m", input="fake: slow 0.01\nthree", stream_id="y"
        )
        events: list[dict[str, Any]] = []
        with trio.fail_after(10):
            while sum(e["type"] == "response.completed" for e in events) < 3:
                events.append(json.loads(await ws.get_message()))
    lanes = [e.get("stream_id") for e in events]
    assert set(lanes) == {"x", "y"}  # every event names its lane
    # Lane y ran while lane x did: their events interleave.
    first_y, last_x = lanes.index("y"), len(lanes) - 1 - lanes[::-1].index("x")
    assert first_y < last_x
    # Lane x's second response starts only after its first ended.
    x_events = [e for e in events if e.get("stream_id") == "x"]
    types = [e["type"] for e in x_events]
    assert types.index("response.completed") < len(types) - 1 - types[::-1].index(
        "response.created"
    )
    texts = [
        e["response"]["output"][-1]["content"][0]["text"]
        for e in x_events
        if e["type"] == "response.completed"
    ]
    assert texts[0].endswith("one") and texts[1].endswith("two")
    assert server.fake.sockets_opened == 1
    await nothing_left(server)


@pytest.mark.parametrize("lane", [None, "steered-lane"])
async def test_steering_a_running_response_commits_in_its_successor(
    server: ProxyServer, lane: str | None
) -> None:
    """`response.steer` reaches the socket its target runs on; the upstream ends the response
    as steered and starts a successor; the client sees it all as one turn of the proxy's, and
    the socket stays pooled for the chain that goes on from the successor."""
    on_lane = {"stream_id": lane} if lane else {}
    async with open_websocket_url(ws_url(server), extra_headers=session("steer")) as ws:
        await send(
            ws,
            type="response.create",
            model="m",
            input="fake: slow 0.05\nfake: long 40",
            **on_lane,
        )
        created = await until(ws, lambda e: e["type"] == "response.created")
        target = created[-1]["response"]["id"]
        await send(ws, type="response.steer", previous_response_id=target, input="shorter please")
        events = await until(ws, lambda e: e["type"] == "response.completed")
        assert {e.get("stream_id") for e in events} == {lane}
        types = [e["type"] for e in events]
        assert "response.steer.accepted" in types
        incomplete = next(e for e in events if e["type"] == "response.incomplete")
        assert incomplete["response"]["incomplete_details"]["reason"] == "steered"
        assert types.index("response.incomplete") < len(types) - 1  # not the turn's end
        successor = [e for e in events if e["type"] == "response.created"][-1]["response"]
        assert successor["id"] != target
        final = events[-1]["response"]
        assert final["id"] == successor["id"]
        await send(
            ws,
            type="response.create",
            model="m",
            input="next",
            previous_response_id=final["id"],
            **on_lane,
        )
        after = await until(ws, lambda e: e["type"] in TERMINALS)
    assert after[-1]["type"] == "response.completed"
    fake = server.fake
    assert fake.sockets_opened == 1
    assert [r.message["type"] for r in fake.received] == [
        "response.create",
        "response.steer",
        "response.create",
    ]
    assert server.proxy.telemetry.clients == {"websocket-in": 2}  # the steered one is one turn
    await nothing_left(server)


async def test_steering_nothing_running_fails_at_the_proxy(server: ProxyServer) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("s2")) as ws:
        await send(ws, type="response.steer", previous_response_id="resp_nobody", input="hi")
        failed = json.loads(await ws.get_message())
        await send(ws, type="response.create", model="m", input="still fine")
        done = await until(ws, lambda e: e["type"] in TERMINALS)
    assert failed["type"] == "response.steer.failed"
    assert failed["error"]["code"] == "response_not_active"
    assert failed["steer"]["input"] == "hi"  # the input comes back to the client
    assert done[-1]["type"] == "response.completed"
    assert all(r.message["type"] == "response.create" for r in server.fake.received)


async def test_an_unknown_event_is_relayed_and_its_answer_comes_back(server: ProxyServer) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("u")) as ws:
        await send(ws, type="session.future_thing", value=1)
        answer = json.loads(await ws.get_message())
        await send(ws, type="response.create", model="m", input="after")
        done = await until(ws, lambda e: e["type"] in TERMINALS)
    fake = server.fake
    assert fake.received[0].message["type"] == "session.future_thing"  # it went upstream
    assert answer["type"] == "error" and answer["error"]["code"] == "unknown_event"
    assert done[-1]["type"] == "response.completed"
    assert fake.sockets_opened == 1  # the socket it was relayed on took the turn
    await nothing_left(server)


async def test_managed_mode_relays_no_unknown_event(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path
) -> None:
    from tests.test_managed import KEY_A, gateway_for

    gateway = await gateway_for(nursery, fake, tmp_path)
    url = ws_url(gateway)
    headers = [("authorization", f"Bearer {KEY_A}"), ("session-id", "m")]
    async with open_websocket_url(url, extra_headers=headers) as ws:
        await send(ws, type="session.future_thing")
        answer = json.loads(await ws.get_message())
    assert answer["error"]["code"] == "unsupported_event"
    assert not fake.received


async def test_a_client_cut_mid_lanes_cancels_them_and_evicts_the_socket(
    server: ProxyServer,
) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("cut")) as ws:
        for lane in ("p", "q"):
            await send(
                ws,
                type="response.create",
                model="m",
                input="fake: slow 0.05\nfake: long 200",
                stream_id=lane,
            )
        await until(ws, lambda e: e["type"] == "response.output_text.delta")
    await wait_until(lambda: server.registry.evictions["abandoned"] == 1)
    await nothing_left(server)
    assert server.fake.open_sockets == 0


async def test_a_client_that_stops_reading_stops_the_upstream_read(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """Back-pressure: nothing piles up without bound in the proxy. The client reads nothing;
    the proxy holds at most its per-turn byte bound (plus a few frames) and the upstream's
    sending stalls long before the reply's end."""
    limit = 256 * 1024
    server = await start_proxy(nursery, fake, event_buffer_bytes=limit)
    word = "w" * 4096
    fake.queue(Reply.message(" ".join([word] * 12000)))  # ~50 MB of deltas
    async with open_websocket_url(ws_url(server), extra_headers=session("bp")) as ws:
        await send(ws, type="response.create", model="m", input="go")
        await ws.get_message()  # response.created: the turn runs
        # Wait until the upstream's sending stalls (TCP buffers full all the way back).
        last = -1
        with trio.fail_after(20):
            while fake.events_sent != last:
                last = fake.events_sent
                await trio.sleep(0.3)
        held = server.registry.buffered_bytes
        assert held <= limit + 2 * (len(word) + 512)
        assert fake.events_sent < 12000 / 2
    await wait_until(lambda: server.registry.evictions["abandoned"] == 1)
    await nothing_left(server)


# -- hostile and unlucky cases (an independent review's findings, each pinned) --------------------
async def test_a_lane_refused_while_another_runs_keeps_the_socket_and_its_chains(
    server: ProxyServer,
) -> None:
    """A named lane's request error leaves the connection as it was (the protocol keeps the
    other lanes' state): the pool keeps the socket, the other lane's `store: false` chain
    continues on it, and nothing is left busy or half-pooled."""
    async with open_websocket_url(ws_url(server), extra_headers=session("soft")) as ws:
        await send(ws, type="response.create", model="m", input="first", store=False, stream_id="a")
        first = (await until(ws, terminal_of("a")))[-1]["response"]["id"]
        await send(
            ws,
            type="response.create",
            model="m",
            input="fake: slow 0.02\nfake: long 30",
            store=False,
            stream_id="a",
            previous_response_id=first,
        )
        await send(
            ws, type="response.create", model="m", input="fake: error bad_thing 400", stream_id="b"
        )
        refused = (await until(ws, terminal_of("b")))[-1]
        second = (await until(ws, terminal_of("a")))[-1]
        await send(
            ws,
            type="response.create",
            model="m",
            input="third",
            store=False,
            stream_id="a",
            previous_response_id=second["response"]["id"],
        )
        third = (await until(ws, terminal_of("a")))[-1]
    assert refused["type"] == "error" and refused["stream_id"] == "b"
    assert second["type"] == third["type"] == "response.completed"
    assert server.fake.sockets_opened == 1 and not server.registry.evictions
    await nothing_left(server)


async def test_seventeen_lanes_all_complete(server: ProxyServer) -> None:
    """16 run at once (the protocol's limit), the 17th waits its turn: nobody is refused."""
    async with open_websocket_url(ws_url(server), extra_headers=session("many")) as ws:
        for n in range(17):
            await send(
                ws,
                type="response.create",
                model="m",
                input=f"fake: slow 0.01\n{n}",
                stream_id=f"l{n}",
            )
        ends: list[dict[str, Any]] = []
        with trio.fail_after(10):
            while len(ends) < 17:
                event = json.loads(await ws.get_message())
                if event["type"] in TERMINALS:
                    ends.append(event)
    assert {e["type"] for e in ends} == {"response.completed"}
    assert server.fake.max_active <= 16 and server.fake.sockets_opened == 1
    await nothing_left(server)


async def test_an_unknown_event_waits_for_the_default_lane(server: ProxyServer) -> None:
    """The upstream answers an unknown event on the default lane, so relaying one while the
    client's default-lane response runs would end that response with the answer: refused
    with a clear error instead, and the response completes."""
    async with open_websocket_url(ws_url(server), extra_headers=session("busy")) as ws:
        await send(ws, type="response.create", model="m", input="fake: slow 0.02\nfake: long 20")
        await until(ws, lambda e: e["type"] == "response.created")
        await send(ws, type="session.future_thing")
        events = await until(ws, lambda e: e["type"] in TERMINALS and e.get("status") != 409)
    refusal = next(e for e in events if e["type"] == "error")
    assert refusal["error"]["code"] == "response_in_progress"
    assert events[-1]["type"] == "response.completed"
    assert all(r.message["type"] == "response.create" for r in server.fake.received)


async def test_a_client_that_reads_none_of_its_answers_is_closed_not_stalling_the_socket(
    server: ProxyServer,
) -> None:
    """Answers to relayed events never make the socket's task wait on the client: past the
    bounds (64 unread answers, 64 events awaiting theirs) the client is closed (1008), and
    the session's next client finds a working socket."""
    headers = session("flood")
    closes = server.proxy.telemetry.clients_closed
    async with open_websocket_url(ws_url(server), extra_headers=headers) as ws:
        with trio.fail_after(10):
            try:
                for _ in range(2000):
                    await send(ws, type="session.future_thing")
                while True:  # drain until the proxy's close
                    await ws.get_message()
            except ConnectionClosed as closed:
                # 1006 when the close frame lost the race with the reset of a socket closed
                # with the flood's rest unread; the proxy's own count says why it closed.
                assert closed.reason.code in (1008, 1006)
    bound = closes["too many unread events"] + closes["too many events awaiting answers"]
    assert bound == 1 and sum(closes.values()) == 1, closes
    async with open_websocket_url(ws_url(server), extra_headers=headers) as ws:
        await send(ws, type="response.create", model="m", input="after the flood")
        done = await until(ws, lambda e: e["type"] in TERMINALS)
    assert done[-1]["type"] == "response.completed"
    await nothing_left(server)


async def test_an_error_from_a_steered_successor_reaches_the_client(server: ProxyServer) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("succ")) as ws:
        await send(ws, type="response.create", model="m", input="fake: slow 0.05\nfake: long 40")
        target = (await until(ws, lambda e: e["type"] == "response.created"))[-1]["response"]["id"]
        await send(
            ws, type="response.steer", previous_response_id=target, input="fake: error boom 500"
        )
        events = await until(ws, lambda e: e["type"] == "error")
    assert events[-1]["error"]["code"] == "boom"
    assert "response.incomplete" in [e["type"] for e in events]


async def test_one_dropped_socket_under_three_lanes_is_one_failure(server: ProxyServer) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("drop3")) as ws:
        for lane in ("x", "y"):
            await send(
                ws,
                type="response.create",
                model="m",
                input="fake: slow 0.05\nfake: long 40",
                stream_id=lane,
            )
        await send(ws, type="response.create", model="m", input="fake: drop 3", stream_id="z")
        with trio.fail_after(10):
            ends = 0
            while ends < 3:
                if json.loads(await ws.get_message())["type"] in TERMINALS:
                    ends += 1
    # One socket failed, once: three lanes on it are not three failures in a row (which
    # would send the session over HTTP for the cool-down).
    assert not server.proxy.fallback._sessions


async def test_a_relayed_event_then_a_create_each_get_their_own_answer(server: ProxyServer) -> None:
    """The upstream takes messages in order: the `error` answering a relayed event arrives
    before anything of the create sent after it, and goes to the client as that answer; the
    create's response is not ended by it, and the socket stays the session's."""
    async with open_websocket_url(ws_url(server), extra_headers=session("rc")) as ws:
        await send(ws, type="response.create", model="m", input="warm up")
        await until(ws, lambda e: e["type"] in TERMINALS)
        await send(ws, type="session.future_thing")
        await send(ws, type="response.create", model="m", input="hello")
        events = await until(ws, lambda e: e["type"] == "response.completed")
    assert events[0]["type"] == "error" and events[0]["error"]["code"] == "unknown_event"
    assert server.fake.sockets_opened == 1 and not server.registry.evictions
    await nothing_left(server)


async def test_a_held_socket_goes_back_when_its_last_relayed_event_settles(
    server: ProxyServer,
) -> None:
    """A client relays an event and leaves before the answer: once the answer comes (or the
    wait for one ends), the session's socket is idle again, and the next client continues on
    it."""
    async with open_websocket_url(ws_url(server), extra_headers=session("h")) as ws:
        await send(ws, type="response.create", model="m", input="hi")
        await until(ws, lambda e: e["type"] in TERMINALS)
    async with open_websocket_url(ws_url(server), extra_headers=session("h")) as ws:
        await send(ws, type="session.future_thing")
    await wait_until(lambda: server.registry.busy == 0)
    async with open_websocket_url(ws_url(server), extra_headers=session("h")) as ws:
        await send(ws, type="response.create", model="m", input="again")
        await until(ws, lambda e: e["type"] in TERMINALS)
    assert server.fake.sockets_opened == 1 and server.proxy.turns["one_turn"] == 0
    await nothing_left(server)


async def test_a_notice_before_a_relayed_events_answer_is_not_taken_for_it(
    server: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an `error` answers a relayed event: a `codex.rate_limits` notice the upstream
    sends on its own just before must not be taken for the answer (the real answer would
    then end the create sent after the event)."""
    send_all = FakeUpstream._send_all

    async def notice_first(self: FakeUpstream, sock: Any, events: Any, *args: Any) -> None:
        if any((e.get("error") or {}).get("code") == "unknown_event" for e in events):
            await sock.ws.send_message(json.dumps({"type": "codex.rate_limits"}))
        await send_all(self, sock, events, *args)

    monkeypatch.setattr(FakeUpstream, "_send_all", notice_first)
    async with open_websocket_url(ws_url(server), extra_headers=session("n")) as ws:
        await send(ws, type="response.create", model="m", input="warm up")
        await until(ws, lambda e: e["type"] in TERMINALS)
        await send(ws, type="session.future_thing")
        await send(ws, type="response.create", model="m", input="hello")
        events = await until(ws, lambda e: e["type"] == "response.completed")
    assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["unknown_event"]
    assert not server.registry.evictions and server.fake.sockets_opened == 1


async def test_an_event_taken_silently_holds_the_socket_only_for_the_answer_wait(
    server: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that takes a relayed event without answering, and a client that leaves at
    once: the socket waits for the answer (`ANSWER_WAIT`) and no longer, then the session's
    next client continues its `store: false` chain on it. An answer is only ever matched to
    the event that asked for it, never to the next client's response."""
    on_message = FakeUpstream._on_message

    def silent(self: FakeUpstream, sock: Any, raw: Any, nursery: trio.Nursery) -> None:
        if json.loads(raw).get("type") != "session.silent":
            on_message(self, sock, raw, nursery)

    monkeypatch.setattr(FakeUpstream, "_on_message", silent)
    monkeypatch.setattr(awaiting, "ANSWER_WAIT", 0.2)
    async with open_websocket_url(ws_url(server), extra_headers=session("r")) as ws:
        await send(ws, type="response.create", model="m", input="warm", store=False)
        rid = (await until(ws, lambda e: e["type"] in TERMINALS))[-1]["response"]["id"]
        await send(ws, type="session.silent")
    await wait_until(lambda: server.registry.busy == 0)
    async with open_websocket_url(ws_url(server), extra_headers=session("r")) as ws:
        await send(
            ws,
            type="response.create",
            model="m",
            input="next",
            previous_response_id=rid,
            store=False,
        )
        done = await until(ws, lambda e: e["type"] in TERMINALS)
    assert done[-1]["type"] == "response.completed"
    assert server.proxy.turns["one_turn"] == 0 and server.fake.sockets_opened == 1
    await nothing_left(server)


async def test_after_a_refused_same_lane_step_the_socket_no_longer_counts_on_its_parent(
    server: ProxyServer,
) -> None:
    """The upstream evicts the parent of a refused same-lane continuation. The proxy forgets
    it too, so the client's full resend of that conversation goes in full on the same socket
    (not as a suffix from the evicted parent, which would cost a fresh socket)."""
    first = [{"role": "user", "content": "one"}]
    async with open_websocket_url(ws_url(server), extra_headers=session("evict")) as ws:
        await send(ws, type="response.create", model="m", input=first, store=False, stream_id="a")
        done = (await until(ws, terminal_of("a")))[-1]["response"]
        history = [*first, *done["output"]]
        await send(
            ws,
            type="response.create",
            model="m",
            input=[{"role": "user", "content": "fake: error bad_step 400"}],
            store=False,
            stream_id="a",
            previous_response_id=done["id"],
        )
        assert (await until(ws, terminal_of("a")))[-1]["type"] == "error"
        await send(
            ws,
            type="response.create",
            model="m",
            input=[*history, {"role": "user", "content": "two"}],
            store=False,
            stream_id="a",
        )
        last = (await until(ws, terminal_of("a")))[-1]
    assert last["type"] == "response.completed"
    creates = server.fake.creates()
    assert server.fake.sockets_opened == 1
    assert "previous_response_id" not in creates[-1].message  # in full, on the same socket
    await nothing_left(server)
