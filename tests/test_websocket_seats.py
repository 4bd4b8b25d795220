"""Lanes on, for WebSocket clients of ours: their default lane takes its session's seat.

Codex with `supports_websockets = true` and the SDK's `client.responses.connect()` send every
turn on the default lane, chained by `previous_response_id`. With lanes on, those turns run on
the session's seat, a lane of the proxy's on a socket shared by the credential's sessions,
exactly as an HTTP client's do; the client never sees the proxy's lane. What cannot share a
socket does not: a lane the client names runs on a socket of its own (its lane names are its
own there), and so does everything after an event the proxy does not know (it may set up the
connection, and must reach no other session). Steering reaches the shared socket only while its
target runs there.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.conftest import ProxyServer, nothing_left, start_proxy, wait_until
from tests.test_websocket_lanes import TERMINALS, send, session, until, ws_url
from trioproxy.events import UpstreamEvent
from trioproxy.fake import FakeUpstream
from trioproxy.fake.lanes import Lanes, Running, request_error
from trioproxy.jobs import Notice


@pytest.fixture
async def server(nursery: trio.Nursery, fake: FakeUpstream) -> ProxyServer:
    return await start_proxy(nursery, fake, lanes=True)


def said(message: dict[str, Any]) -> Any:
    """What a create said last (its input as a string, or its last item's content)."""
    value = message["input"]
    return value if isinstance(value, str) else value[-1]["content"]


def ended(event: dict[str, Any]) -> bool:
    return event["type"] in TERMINALS


class Client:
    """A Codex-shaped WebSocket client: warms up, then chains each turn by id, new items only."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.last: str | None = None

    async def turn(self, text: str, **extra: Any) -> list[dict[str, Any]]:
        chain = {"previous_response_id": self.last} if self.last else {}
        await send(self.ws, type="response.create", model="m", input=text, **chain, **extra)
        events = await until(self.ws, ended)
        assert events[-1]["type"] == "response.completed", events[-1]
        assert not any("stream_id" in e for e in events), "a proxy lane reached the client"
        self.last = events[-1]["response"]["id"]
        return events


async def test_codex_shaped_websocket_sessions_share_one_socket_each_on_a_lane(
    server: ProxyServer,
) -> None:
    async with (
        open_websocket_url(ws_url(server), extra_headers=session("a")) as wa,
        open_websocket_url(ws_url(server), extra_headers=session("b")) as wb,
    ):
        a, b = Client(wa), Client(wb)
        for step in range(3):
            await a.turn(f"a {step}", generate=True)
            await b.turn(f"b {step}")
    fake = server.fake
    assert fake.sockets_opened == 1
    creates = [r.message for r in fake.creates()]
    lanes = [c["stream_id"] for c in creates]
    assert len(set(lanes)) == 2 and all(lane.startswith("tp") for lane in lanes)
    by_lane = {lane: [c for c in creates if c["stream_id"] == lane] for lane in set(lanes)}
    for turns in by_lane.values():  # each session's chain on its own lane, new items only
        assert "previous_response_id" not in turns[0]
        assert all(t["previous_response_id"] for t in turns[1:])
    assert server.proxy.placements["new"] == 2
    await nothing_left(server)


async def test_a_reconnecting_client_continues_its_chain_on_its_seat(
    server: ProxyServer,
) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("r")) as ws:
        first = Client(ws)
        await first.turn("one")
    async with open_websocket_url(ws_url(server), extra_headers=session("r")) as ws:
        again = Client(ws)
        again.last = first.last
        await again.turn("two")
    creates = server.fake.creates()
    assert server.fake.sockets_opened == 1
    assert creates[1].message["previous_response_id"] == first.last
    assert creates[0].message["stream_id"] == creates[1].message["stream_id"]
    await nothing_left(server)


async def test_a_client_cut_mid_response_ends_only_its_own_lane(server: ProxyServer) -> None:
    async with open_websocket_url(ws_url(server), extra_headers=session("stay")) as ws_stay:
        stay = Client(ws_stay)
        await stay.turn("warm")
        async with open_websocket_url(ws_url(server), extra_headers=session("cut")) as ws_cut:
            await send(
                ws_cut, type="response.create", model="m", input="fake: slow 0.05\nfake: long 200"
            )
            await until(ws_cut, lambda e: e["type"] == "response.output_text.delta")
        await stay.turn("fake: slow 0.01\nfake: long 20")
    assert server.fake.sockets_opened == 1 and not server.registry.evictions
    await nothing_left(server)


async def test_steering_a_seated_response_and_a_malformed_steer_both_answer_the_client(
    server: ProxyServer,
) -> None:
    """Accepted steering commits in a successor on the seat's lane; a steer the upstream
    refuses at once (its answer on the default lane, naming the response) reaches its client,
    and the turn still ends when its response does (no wait for an answer that went nowhere)."""
    async with open_websocket_url(ws_url(server), extra_headers=session("st")) as ws:
        await send(ws, type="response.create", model="m", input="fake: slow 0.05\nfake: long 40")
        created = await until(ws, lambda e: e["type"] == "response.created")
        target = created[-1]["response"]["id"]
        await send(ws, type="response.steer", previous_response_id=target, input=[{"x": 1}])
        # On a shared socket one steer awaits its answer at a time: the next goes after it.
        early = await until(ws, lambda e: e["type"] == "response.steer.failed")
        # A lane name riding along would reach another session's lane: it does not go.
        await send(
            ws, type="response.steer", previous_response_id=target, input="shorter", stream_id="tp1"
        )
        events = early + await until(ws, lambda e: e["type"] == "response.completed")
    types = [e["type"] for e in events]
    assert "response.steer.failed" in types and "response.steer.accepted" in types
    assert [set(r.message) for r in server.fake.steers()][-1] == {
        "type",
        "previous_response_id",
        "input",
    }
    failed = next(e for e in events if e["type"] == "response.steer.failed")
    assert failed["error"]["code"] == "invalid_input"
    assert not any("stream_id" in e for e in events)
    assert events[-1]["response"]["id"] != target  # the successor committed the steering
    assert server.fake.sockets_opened == 1
    await nothing_left(server)


@pytest.mark.parametrize("lanes", [True, False])
async def test_steering_answers_without_a_lane_reach_the_response_they_name(
    nursery: trio.Nursery, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch, lanes: bool
) -> None:
    """The protocol says terminals and request errors echo a lane; an upstream that answers
    steering on the default lane instead: each answer still reaches the turn whose response it
    names (on a shared socket no client hears the default lane; on a client's own socket its
    default lane may run another response), and that turn ends when its response does."""
    stamp = Running.stamp

    def unlaned_steering(self: Running, event: dict[str, Any]) -> None:
        stamp(self, event)
        if event["type"].startswith("response.steer."):
            event.pop("stream_id", None)

    monkeypatch.setattr(Running, "stamp", unlaned_steering)
    server = await start_proxy(nursery, fake, lanes=lanes)
    on_lane = {} if lanes else {"stream_id": "mine"}
    async with open_websocket_url(ws_url(server), extra_headers=session("st")) as ws:
        slow = "fake: slow 0.05\nfake: long 40"
        await send(ws, type="response.create", model="m", input=slow, **on_lane)
        created = await until(ws, lambda e: e["type"] == "response.created")
        target = created[-1]["response"]["id"]
        await send(ws, type="response.steer", previous_response_id=target, input=[{"x": 1}])
        early = await until(ws, lambda e: e["type"] == "response.steer.failed")
        await send(ws, type="response.steer", previous_response_id=target, input="shorter")
        events = early + await until(ws, lambda e: e["type"] == "response.completed")
    types = [e["type"] for e in events]
    assert "response.steer.failed" in types and "response.steer.accepted" in types
    assert events[-1]["response"]["id"] != target
    await nothing_left(server)


async def test_steering_whose_response_ended_is_not_sent_on_a_shared_socket(
    server: ProxyServer,
) -> None:
    """On a shared socket a steer's answer would come on a lane another session may hold by
    then: a steer whose target no longer runs there is refused to its client, never sent."""
    async with open_websocket_url(ws_url(server), extra_headers=session("late")) as ws:
        done = await Client(ws).turn("hi")
    conn = next(iter(server.registry.lanes.sessions.seats.values())).conn
    heard: list[UpstreamEvent] = []

    class Collect:
        def offer(self, event: UpstreamEvent) -> None:
            heard.append(event)

    refusal = UpstreamEvent("response.steer.failed", '{"type":"response.steer.failed"}', {})
    rid = done[-1]["response"]["id"]
    payload = json.dumps({"type": "response.steer", "previous_response_id": rid, "input": "x"})
    notice = Notice(payload.encode(), rid, sink=Collect(), refusal=refusal)
    assert conn.submit(notice)
    with trio.fail_after(5):
        await notice.settled.wait()
    assert heard == [refusal]
    assert server.fake.steers() == []
    await nothing_left(server)


async def test_a_lane_the_client_names_runs_on_a_socket_of_its_own(server: ProxyServer) -> None:
    """Even a name the proxy uses itself: the client's `tp0` is its own, on its own socket,
    and the session seated on the shared socket's `tp0` hears none of it."""
    async with (
        open_websocket_url(ws_url(server), extra_headers=session("seated")) as ws_seated,
        open_websocket_url(ws_url(server), extra_headers=session("named")) as ws_named,
    ):
        seated = Client(ws_seated)
        await seated.turn("first")
        await Client(ws_named).turn("on the default lane")
        await send(ws_named, type="response.create", model="m", input="mine", stream_id="tp0")
        named = await until(ws_named, ended)
        await seated.turn("second")
    assert named[-1]["type"] == "response.completed"
    assert {e["stream_id"] for e in named} == {"tp0"}
    fake = server.fake
    assert fake.sockets_opened == 2
    sockets = {said(r.message): r.socket for r in fake.creates()}
    assert (
        sockets["mine"] != sockets["first"] == sockets["second"] == sockets["on the default lane"]
    )
    await nothing_left(server)


async def test_an_unknown_event_takes_the_client_to_a_socket_of_its_own(
    server: ProxyServer,
) -> None:
    """An event the proxy does not know may set up the connection for what follows, and on a
    shared socket it would reach the other sessions: it goes on a socket of the client's own,
    and so do the client's turns after it."""
    async with open_websocket_url(ws_url(server), extra_headers=session("other")) as ws_other:
        other = Client(ws_other)
        await other.turn("seated")
        async with open_websocket_url(ws_url(server), extra_headers=session("u")) as ws:
            await Client(ws).turn("seated too")
            await send(ws, type="session.future_thing", value=1)
            answer = json.loads(await ws.get_message())
            await send(ws, type="response.create", model="m", input="after")
            after = await until(ws, ended)
        await other.turn("still seated")
    assert answer["error"]["code"] == "unknown_event"
    assert after[-1]["type"] == "response.completed"
    fake = server.fake
    assert fake.sockets_opened == 2
    relayed = next(r for r in fake.received if r.message["type"] == "session.future_thing")
    moved = next(r for r in fake.creates() if said(r.message) == "after")
    assert relayed.socket == moved.socket and "stream_id" not in moved.message
    shared = {r.socket for r in fake.creates() if "stream_id" in r.message}
    assert relayed.socket not in shared
    await wait_until(lambda: server.registry.busy == 0)
    await nothing_left(server)


async def test_sdk_connect_sessions_take_seats_on_one_socket(server: ProxyServer) -> None:
    """The SDK's `client.responses.connect()`, two sessions at once: warm-up and chained turns
    each on its own seat of one shared socket, every event parsed by the SDK's types."""
    from tests.test_websocket_clients import REASONING, sdk
    from tests.test_websocket_clients import turn as sdk_turn

    def run(name: str) -> list[Any]:
        ends = []
        with sdk(server).responses.connect(extra_headers={"session-id": name}) as connection:
            _, warm = sdk_turn(connection, input=[], generate=False, **REASONING)
            previous = warm.response.id
            for word in ("one", "two"):
                _, end = sdk_turn(
                    connection, input=word, previous_response_id=previous, **REASONING
                )
                ends.append(end)
                previous = end.response.id
        return ends

    results: dict[str, list[Any]] = {}

    async def session_of(name: str) -> None:
        results[name] = await trio.to_thread.run_sync(run, name)

    async with trio.open_nursery() as group:
        for name in ("x", "y"):
            group.start_soon(session_of, name)
    for ends in results.values():
        assert [end.type for end in ends] == ["response.completed"] * 2
        assert ends[-1].response.output[-1].content[0].text == "You said: two"
    fake = server.fake
    assert fake.sockets_opened == 1
    assert len({c.message["stream_id"] for c in fake.creates()}) == 2
    await nothing_left(server)


async def running_beside(ws: WebSocketConnection) -> None:
    """A session that has a response streaming on the shared socket."""
    await send(ws, type="response.create", model="m", input="fake: slow 0.05\nfake: long 60")
    await until(ws, lambda e: e["type"] == "response.output_text.delta")


async def test_a_steer_the_upstream_refuses_without_a_lane_fails_for_its_client_alone(
    server: ProxyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that takes no steering answers it as any unknown message: an `error` on the
    default lane. On a shared socket that is the steer's answer (its client gets
    `response.steer.failed` with the upstream's error), not the connection's error that would
    end every seated session's response."""

    def no_steering(self: Lanes, message: dict[str, Any]) -> dict[str, Any]:
        return request_error(400, "unknown_event", "expected response.create")

    monkeypatch.setattr(Lanes, "steer", no_steering)
    async with (
        open_websocket_url(ws_url(server), extra_headers=session("a")) as wa,
        open_websocket_url(ws_url(server), extra_headers=session("b")) as wb,
    ):
        await running_beside(wb)
        await send(wa, type="response.create", model="m", input="fake: slow 0.05\nfake: long 20")
        created = await until(wa, lambda e: e["type"] == "response.created")
        target = created[-1]["response"]["id"]
        await send(wa, type="response.steer", previous_response_id=target, input="x")
        a_events = await until(wa, lambda e: e["type"] == "response.completed")
        b_events = await until(wb, ended)
    failed = next(e for e in a_events if e["type"] == "response.steer.failed")
    assert failed["error"]["code"] == "unknown_event"
    assert failed["steer"] == {"input": "x", "previous_response_id": target}
    assert a_events[-1]["response"]["id"] == target  # nothing steered: the response ran out
    assert b_events[-1]["type"] == "response.completed"
    assert server.fake.sockets_opened == 1 and not server.registry.evictions
    await nothing_left(server)


async def test_a_steer_too_large_for_the_upstream_is_its_clients_failure(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """The upstream closes the shared socket (1009) for a steer past its message limit: the
    steering client hears its steer failed; the session whose turn went out last is not told
    its request was too large (its turn ends as a closed socket, like every other lane's)."""
    fake.max_message_bytes = 300_000
    server = await start_proxy(nursery, fake, lanes=True, http_fallback=False)
    async with (
        open_websocket_url(ws_url(server), extra_headers=session("a")) as wa,
        open_websocket_url(ws_url(server), extra_headers=session("b")) as wb,
    ):
        await send(wa, type="response.create", model="m", input="fake: slow 0.05\nfake: long 60")
        created = await until(wa, lambda e: e["type"] == "response.created")
        await running_beside(wb)  # b's request is the last turn sent
        huge = "y" * 700_000  # past the upstream's 300,000 bytes
        target = created[-1]["response"]["id"]
        await send(wa, type="response.steer", previous_response_id=target, input=huge)
        # The steer's failure and its turn's end come by different ways: both, in some order.
        a_events = await until(wa, lambda e: e["type"] == "error")
        if not any(e["type"] == "response.steer.failed" for e in a_events):
            a_events += await until(wa, lambda e: e["type"] == "response.steer.failed")
        b_events = await until(wb, ended)
    failed = [e for e in a_events if e["type"] == "response.steer.failed"]
    assert len(failed) == 1 and failed[0]["steer"]["previous_response_id"] == target
    assert b_events[-1]["error"]["code"] == "upstream_connection_closed"
    await nothing_left(server)


async def test_a_turn_on_a_one_turn_socket_does_not_take_the_client_off_its_seat(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """Two clients of one session, one lane per socket: while one runs on the seat the other's
    turn gets a one-turn socket (no chain lives there), and its next turns go back to the seat
    rather than to a socket of its own."""
    server = await start_proxy(nursery, fake, lanes=True, lanes_per_socket=1)
    async with (
        open_websocket_url(ws_url(server), extra_headers=session("s")) as w1,
        open_websocket_url(ws_url(server), extra_headers=session("s")) as w2,
    ):
        c1, c2 = Client(w1), Client(w2)
        await c1.turn("one")
        await running_beside(w1)
        await c2.turn("two")  # the seat is busy and no lane is free: a one-turn socket
        await until(w1, ended)
        opened = fake.sockets_opened
        c2.last = None
        await c2.turn("three")
        await c2.turn("four")
    assert fake.sockets_opened == opened
    await nothing_left(server)


@pytest.mark.parametrize("lanes", [True, False])
async def test_a_chain_made_on_a_named_lane_continues_on_the_default_lane(
    nursery: trio.Nursery, fake: FakeUpstream, lanes: bool
) -> None:
    """Once a client names a lane its default lane runs beside it on its own socket, so a
    `store: false` chain crosses between them as on a direct connection, lanes on or off."""
    server = await start_proxy(nursery, fake, lanes=lanes)
    async with open_websocket_url(ws_url(server), extra_headers=session("m")) as ws:
        await send(ws, type="response.create", model="m", input="hi", stream_id="x", store=False)
        named = await until(ws, ended)
        rid = named[-1]["response"]["id"]
        await send(
            ws,
            type="response.create",
            model="m",
            input="next",
            store=False,
            previous_response_id=rid,
        )
        after = await until(ws, ended)
    assert after[-1]["type"] == "response.completed", after[-1]
    assert fake.sockets_opened == 1
    await nothing_left(server)
