"""Lanes on: sessions on named lanes of shared upstream sockets (lanes.py, lanepool.py).

The proxy core talks real WebSocket protocol to the fake upstream, whose lanes behave as the
protocol documents them (per-lane FIFO, interleaved events, `stream_id` echoed, 16 active and
32 named per connection, one cache shared by a connection's lanes). Times run on a MockClock.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import memory_connector, post, request_body, sse_events, start_proxy, user
from trioproxy import keys
from trioproxy.config import Settings
from trioproxy.errors import ApiError
from trioproxy.events import parse_frame, without_lane
from trioproxy.fake import FakeUpstream, Reply
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry
from trioproxy.targets import api_target
from trioproxy.turn import TurnEnd
from trioproxy.turnstream import TurnStream


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def laned_proxy(nursery: trio.Nursery, fake: FakeUpstream, **settings: Any) -> Proxy:
    config = Settings(upstream="ws://fake/v1/responses", lanes=True, **settings)
    registry = Registry(config, memory_connector(fake))
    await nursery.start(registry.run)
    return Proxy(config, registry)


def headers(session: str, key: str = "sk-test-key") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}"), ("session-id", session)]


async def start(proxy: Proxy, session: str, items: list[Any], **kw: Any) -> TurnStream:
    body = {"model": "m", "input": items}
    return await proxy.open_turn(body, headers(session, **kw), api_target(proxy.settings))


async def finish(stream: TurnStream) -> tuple[TurnEnd, list[Any], list[dict[str, Any]]]:
    events = [event.data async for event in stream]
    end = stream.end
    output = end.event.data.get("response", {}).get("output", []) if end.event else []
    if end.event is not None:
        events.append(end.event.data)
    return end, output, events


async def turn(proxy: Proxy, session: str, items: list[Any], **kw: Any) -> tuple[TurnEnd, list]:
    end, output, events = await finish(await start(proxy, session, items, **kw))
    assert all("stream_id" not in event for event in events), "a proxy lane reached a client"
    return end, output


async def seated(proxy: Proxy) -> tuple[Session, Session]:
    """Sessions `a` and `b`, one turn each: a seat each, on one shared socket."""
    a, b = Session(proxy, "a"), Session(proxy, "b")
    await a.say("a one")
    await b.say("b one")
    return a, b


class Session:
    """A client that echoes each response's output back, as Codex does."""

    def __init__(self, proxy: Proxy, name: str, **kw: Any) -> None:
        self.proxy, self.name, self.kw = proxy, name, kw
        self.history: list[Any] = []

    async def say(self, text: str) -> TurnEnd:
        self.history.append(user(text))
        end, output = await turn(self.proxy, self.name, self.history, **self.kw)
        assert end.kind == "completed", end
        self.history.extend(output)
        return end


def creates_of(fake: FakeUpstream, text: str) -> list[dict[str, Any]]:
    """The creates whose new input ends with the user message `text`."""
    return [r.message for r in fake.creates() if r.message["input"][-1] == user(text)]


async def test_sessions_share_sockets_each_on_its_own_lane(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, lanes_per_socket=4)
    sessions = [Session(proxy, f"session-{n}") for n in range(10)]
    for s in sessions:
        await s.say(f"{s.name} one")
    for s in sessions:
        await s.say(f"{s.name} two")
    assert fake.sockets_opened == 3  # 4 + 4 + 2 sessions
    lanes = set()
    for s in sessions:
        (first,) = creates_of(fake, f"{s.name} one")
        (second,) = creates_of(fake, f"{s.name} two")
        assert first["stream_id"] == second["stream_id"]  # its lane, both turns
        assert "previous_response_id" not in first
        assert second["previous_response_id"] and second["input"] == [user(f"{s.name} two")]
        lanes.add(first["stream_id"])
    assert lanes <= {f"tp{n}" for n in range(4)}  # the proxy's names, never a session id
    assert all("session-id" not in h and "session_id" not in h for h in fake.handshakes)
    assert proxy.turns["suffix"] == 10 and proxy.turns["full"] == 10
    assert proxy.registry.stats()["seats"] == 10
    await proxy.registry.aclose()


async def test_a_second_request_on_a_busy_session_forks_on_another_lane(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    s = Session(proxy, "s1")
    await s.say("hello")
    parent = fake.creates()[-1]
    first = await start(proxy, "s1", [*s.history, user("slow one\nfake: slow 1")])
    second = await start(proxy, "s1", [*s.history, user("quick one")])
    (end2, _, _), (end1, _, _) = await finish(second), await finish(first)
    assert end1.kind == end2.kind == "completed"
    assert fake.sockets_opened == 1
    slow, quick = creates_of(fake, "slow one\nfake: slow 1")[0], creates_of(fake, "quick one")[0]
    rid = proxy.registry.lanes.sessions.get(_key(proxy, "s1")).memory.response_id  # type: ignore[union-attr]
    assert rid == end1.event.data["response"]["id"]  # type: ignore[union-attr]
    assert slow["previous_response_id"] == quick["previous_response_id"]  # both from "hello"
    assert quick["input"] == [user("quick one")]  # a fork: only its new items
    assert quick["stream_id"] != slow["stream_id"] == parent.message["stream_id"]
    assert proxy.placements["fork"] == 1 and proxy.registry.lanes.forks == 1
    assert proxy.registry.stats()["seats"] == 1  # the fork's lane went back when it ended
    await proxy.registry.aclose()


def _key(proxy: Proxy, session: str) -> str:
    upstream = api_target(proxy.settings).upstream(headers(session), None)
    assert upstream.key is not None
    return upstream.key


async def test_a_client_cut_mid_turn_ends_only_its_own_lane(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    a, b = await seated(proxy)
    cut = await start(proxy, "a", [*a.history, user("a long\nfake: slow 0.5\nfake: deltas 20")])
    other = await start(proxy, "b", [*b.history, user("b long\nfake: slow 0.5\nfake: deltas 20")])
    await cut.__anext__()
    await cut.aclose()  # the client went away mid-turn
    end, output, _ = await finish(other)
    assert end.kind == "completed"  # the other session's turn on the same socket went on
    assert cut.turn.end is not None and cut.turn.end.kind == "abandoned"
    assert fake.open_sockets == 1 and proxy.registry.live == 1
    assert proxy.registry.lanes.moved["turn_abandoned"] == 1
    b.history.extend([user("b long\nfake: slow 0.5\nfake: deltas 20"), *output])
    await b.say("b again")  # still a suffix on its lane
    assert creates_of(fake, "b again")[0]["input"] == [user("b again")]
    # The cut session starts afresh (its lane forgot it), on the same socket.
    a.history = [user("a restart")]
    await a.say("a restart two")
    restart = creates_of(fake, "a restart two")[0]
    assert "previous_response_id" not in restart and fake.sockets_opened == 1
    await proxy.registry.aclose()


async def test_a_socket_error_ends_only_its_turns_and_sessions_continue_afresh(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, lanes_per_socket=2)
    a, b, c = Session(proxy, "a"), Session(proxy, "b"), Session(proxy, "c")
    for s in (a, b, c):
        await s.say(f"{s.name} one")
    assert fake.sockets_opened == 2  # a and b on socket 1, c on socket 2
    slow = await start(proxy, "b", [*b.history, user("b slow\nfake: slow 0.2")])
    dropped = await start(proxy, "a", [*a.history, user("a drop\nfake: drop 3")])
    elsewhere = await start(proxy, "c", [*c.history, user("c slow\nfake: slow 0.2")])
    ends = [(await finish(s))[0] for s in (dropped, slow, elsewhere)]
    assert ends[0].kind == ends[1].kind == "socket"
    assert ends[0].error is not None and ends[1].error is not None  # each hears why
    assert ends[2].kind == "completed"  # another socket's turn is untouched
    for s in (a, b):
        s.history.append(user(f"{s.name} again"))
        end, _ = await turn(proxy, s.name, s.history)
        assert end.kind == "completed"
        assert "previous_response_id" not in creates_of(fake, f"{s.name} again")[0]
    assert fake.sockets_opened == 3
    await proxy.registry.aclose()


async def test_two_credentials_never_share_a_socket(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream(require_auth=False)
    proxy = await laned_proxy(nursery, fake)
    await Session(proxy, "s1", key="sk-one").say("one")
    await Session(proxy, "s2", key="sk-two").say("two")
    await Session(proxy, "s3", key="sk-one").say("three")
    sockets = {r.socket for r in fake.creates()}
    assert fake.sockets_opened == 2 and len(sockets) == 2
    assert fake.creates()[0].socket == fake.creates()[2].socket
    await proxy.registry.aclose()


async def test_the_stream_limit_is_cured_without_the_client_seeing_it(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    fake.named_limit = 2  # the upstream takes fewer names than the protocol says
    proxy = await laned_proxy(nursery, fake)
    for n in range(5):
        await Session(proxy, f"s{n}").say(f"hello {n}")
    assert proxy.retries["websocket_stream_limit_reached"] == 1  # once: the socket is capped
    assert fake.sockets_opened == 3  # 2 + 2 + 1
    await proxy.registry.aclose()


async def test_an_upstream_without_lanes_gets_a_socket_per_session(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    fake.lanes_enabled = False
    proxy = await laned_proxy(nursery, fake)
    s1, s2 = Session(proxy, "s1"), Session(proxy, "s2")
    await s1.say("one")
    await s2.say("two")
    await s1.say("one again")
    assert proxy.retries["invalid_stream_id"] == 1  # once, then sockets of their own
    assert creates_of(fake, "one again")[0]["input"] == [user("one again")]  # suffix still
    assert sum(1 for r in fake.creates() if "stream_id" in r.message) == 1
    await proxy.registry.aclose()


async def test_a_connection_at_its_limit_is_left_and_its_sessions_resend_once(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    fake.max_socket_age = 100  # shorter than the proxy believes
    proxy = await laned_proxy(nursery, fake)
    a, b = await seated(proxy)
    await trio.sleep(150)
    await a.say("a two")  # refused upstream, retried on a new socket with the full input
    await b.say("b two")
    assert proxy.retries["websocket_connection_limit_reached"] == 1
    assert "previous_response_id" not in creates_of(fake, "a two")[-1]
    assert "previous_response_id" not in creates_of(fake, "b two")[-1]  # moved at once
    assert fake.sockets_opened == 2
    await a.say("a three")
    assert creates_of(fake, "a three")[0]["input"] == [user("a three")]
    await proxy.registry.aclose()


async def test_rotation_stops_new_seats_and_moves_sessions_one_by_one(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    # usable life 3400 s; the last quarter (from 2550 s) is the rotation window.
    proxy = await laned_proxy(nursery, fake, max_lifetime=4000, turn_timeout=600, idle_ttl=3000)
    sessions = [Session(proxy, f"s{n}") for n in range(8)]
    for s in sessions:
        await s.say("one")
    await trio.sleep(2560)
    await Session(proxy, "late").say("hello")
    assert fake.creates()[-1].socket == 2  # the old socket takes no new session

    def moved() -> int:  # full-input turns on the new socket, the late session's aside
        full = [r for r in fake.creates() if "previous_response_id" not in r.message]
        return sum(1 for r in full if r.socket == 2) - 1

    for s in sessions:
        await s.say("two")
    assert moved() == 1  # tp0's time came; the others keep their chains for now
    await trio.sleep(140)  # 2700 s: lanes 1-5 are due
    for s in sessions:
        await s.say("three")
    assert moved() == 1 + 5
    await trio.sleep(200)
    for s in sessions:
        await s.say("four")
    assert moved() == 8
    assert proxy.registry.lanes.moved["rotated"] == 8
    await proxy.registry.aclose()


async def test_idle_seats_expire_and_an_empty_socket_closes(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, idle_ttl=100, max_lifetime=3600, turn_timeout=60)
    a, b = Session(proxy, "a"), Session(proxy, "b")
    await a.say("one")
    await trio.sleep(50)
    await b.say("one")
    await trio.sleep(60)  # a's seat expired; b's not
    assert proxy.registry.stats()["seats"] == 1 and fake.open_sockets == 1
    await trio.sleep(100)
    assert proxy.registry.stats()["seats"] == 0
    await fake.wait_open_sockets(0)
    assert proxy.registry.live == 0
    await proxy.registry.aclose()


async def test_a_thousand_codex_sessions_use_at_most_32_sockets(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream(keep_messages=False)
    proxy = await laned_proxy(nursery, fake)

    async def session(n: int) -> None:
        await Session(proxy, f"codex-{n}").say("hi")

    async with trio.open_nursery() as group:
        for n in range(1000):
            group.start_soon(session, n)
    assert fake.sockets_opened <= 32
    assert proxy.registry.stats()["seats"] == 1000
    assert fake.max_active <= 16
    await proxy.registry.aclose()


async def test_a_refused_lane_turn_keeps_the_socket_and_the_others(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    a, b = await seated(proxy)
    fake.queue(Reply.error("invalid_value", 400))
    end, _ = await turn(proxy, "a", [*a.history, user("bad")])
    assert end.kind == "error"  # the client hears the refusal
    await b.say("two")  # the other session's chain is intact
    assert creates_of(fake, "two")[0]["input"] == [user("two")]
    assert fake.sockets_opened == 1
    await proxy.registry.aclose()


async def test_http_clients_share_a_socket_and_never_see_a_lane(nursery: trio.Nursery) -> None:
    """Real sockets end to end: SSE answers carry no `stream_id`, JSON answers neither."""
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake, lanes=True)
    async with server.client() as client:
        histories: dict[str, list[Any]] = {"one": [user("a")], "two": [user("b")]}
        for session, history in histories.items():
            reply = await post(client, request_body(history), session)
            assert reply.status_code == 200 and "stream_id" not in reply.text
            history.extend([*reply.json()["output"], user("again")])
        for session, history in histories.items():
            body = request_body(history, stream=True)
            reply = await post(client, body, session)
            assert reply.status_code == 200 and "stream_id" not in reply.text
            assert sse_events(reply.text)[-1][0] == "response.completed"
    assert fake.sockets_opened == 1
    assert [len(r.message["input"]) for r in fake.creates()] == [1, 1, 1, 1]
    assert {r.message["stream_id"] for r in fake.creates()} == {"tp0", "tp1"}


async def test_two_requests_of_a_new_session_take_one_seat_and_a_fork(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Both arrive while the group's socket is being opened: the second finds the first's
    seat busy and forks, instead of a second seat under the same key that would leak."""
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, idle_ttl=100, max_lifetime=3600, turn_timeout=60)
    ends: list[str] = []

    async def one(text: str) -> None:
        end, _ = await turn(proxy, "new", [user(text)])
        ends.append(end.kind)

    async with trio.open_nursery() as group:
        group.start_soon(one, "first\nfake: slow 0.1")
        group.start_soon(one, "second")
    assert ends == ["completed", "completed"]
    assert proxy.registry.stats()["seats"] == 1
    await trio.sleep(150)  # the one seat expires, and with it the socket
    await fake.wait_open_sockets(0)
    assert proxy.registry.live == 0
    await proxy.registry.aclose()


async def test_a_cut_turn_past_its_deadline_does_not_break_the_others(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, turn_timeout=30, read_timeout=20, max_lifetime=3600)
    await Session(proxy, "a").say("a one")
    await Session(proxy, "b").say("b one")
    cut = await start(proxy, "a", [user("a runs long\nfake: slow 1\nfake: long 200")])
    await cut.__anext__()
    await cut.aclose()  # its response keeps running upstream past its turn_timeout
    await trio.sleep(20)
    end, _ = await turn(proxy, "b", [user("b long\nfake: slow 1\nfake: long 20")])
    assert end.kind == "completed"  # the cut lane's deadline passed meanwhile: only it ended
    await proxy.registry.aclose()


async def test_a_body_type_cannot_turn_a_create_into_another_event(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    body = {"model": "m", "input": [user("hi")], "type": "response.steer"}
    stream = await proxy.open_turn(body, headers("x"), api_target(proxy.settings))
    end, _, _ = await finish(stream)
    assert end.kind == "completed"
    assert fake.received[-1].message["type"] == "response.create"
    await proxy.registry.aclose()


async def test_sessions_waiting_for_a_socket_hear_its_failure_together(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    fake.stall_handshakes = True
    proxy = await laned_proxy(nursery, fake, connect_timeout=10)
    failed: list[float] = []

    async def one(n: int) -> None:
        with pytest.raises(ApiError):
            await start(proxy, f"s{n}", [user("hi")])
        failed.append(trio.current_time())

    async with trio.open_nursery() as group:
        for n in range(8):
            group.start_soon(one, n)
    assert max(failed) - min(failed) < 1  # one handshake's timeout, not eight in a row
    await proxy.registry.aclose()


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"response.output_text.delta","delta":"a","sequence_number":3,"stream_id":"tp3"}',
        '{"stream_id":"tp3","type":"x","delta":"b"}',
        '{"stream_id": "tp1", "type": "x"}',
        '{"type": "x", "delta": "say \\"stream_id\\":\\"tp3\\", ok", "stream_id": "tp1"}',
        '{"type":"x","response":{"stream_id":"kept"},"stream_id":"tp1"}',
    ],
)
def test_the_lane_is_taken_out_of_an_event_and_nothing_else(frame: str) -> None:
    event = without_lane(parse_frame(frame))
    expected = json.loads(frame)
    del expected["stream_id"]
    assert json.loads(event.raw) == event.data == expected


async def test_a_client_that_stops_reading_never_stalls_the_other_lanes(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, event_buffer_bytes=64 * 1024)
    await Session(proxy, "a").say("a one")
    await Session(proxy, "b").say("b one")
    stuck = await start(proxy, "a", [user("fake: long 40000")])  # ~40,000 deltas, never read
    end, _ = await turn(proxy, "b", [user("b two\nfake: long 2000")])
    assert end.kind == "completed"  # b's lane went on while a's client read nothing
    events = [event async for event in stuck]
    assert stuck.end.kind == "timeout" and stuck.end.error is not None
    assert stuck.end.error.code == "client_too_slow"
    assert sum(len(e.raw) for e in events) <= 64 * 1024 + 1024  # held no more than its bound
    assert fake.open_sockets == 1
    await proxy.registry.aclose()


async def test_a_store_false_fork_goes_in_full_on_another_lane_of_the_same_socket(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """With store=false the upstream keeps a lane's latest response only: once the session's
    lane continued from its last response, a fork from it would be refused (the fake knows
    this), so the concurrent request goes with its full input, on the same socket."""
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    history = [user("hello")]
    first = await proxy.open_turn(
        {"model": "m", "input": history, "store": False}, headers("s"), api_target(proxy.settings)
    )
    _, output, _ = await finish(first)
    history = [*history, *output]

    async def go(text: str) -> TurnEnd:
        body = {"model": "m", "input": [*history, user(text)], "store": False}
        end, _, _ = await finish(
            await proxy.open_turn(body, headers("s"), api_target(proxy.settings))
        )
        return end

    ends: list[TurnEnd] = []

    async def run(text: str) -> None:
        ends.append(await go(text))

    async with trio.open_nursery() as group:
        group.start_soon(run, "slow\nfake: slow 1")
        await trio.sleep(0.5)
        group.start_soon(run, "quick")
    assert [e.kind for e in ends] == ["completed", "completed"]
    quick = creates_of(fake, "quick")[0]
    assert "previous_response_id" not in quick and len(quick["input"]) == 3
    assert quick["stream_id"] != creates_of(fake, "slow\nfake: slow 1")[0]["stream_id"]
    assert fake.sockets_opened == 1 and proxy.placements["fork"] == 1
    assert not proxy.retries  # no refused suffix first
    await proxy.registry.aclose()


async def test_a_lane_that_breaks_its_response_ends_alone(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    a, b = await seated(proxy)
    broken = await start(proxy, "a", [*a.history, user("a two\nfake: slow 0.2\nfake: deltas 20")])
    other = await start(proxy, "b", [*b.history, user("b two\nfake: slow 0.2\nfake: deltas 20")])
    lane = creates_of(fake, "a two\nfake: slow 0.2\nfake: deltas 20")[0]["stream_id"]
    intruder = {"type": "response.in_progress", "stream_id": lane, "response": {"id": "resp_x"}}
    await fake.send_stray(json.dumps(intruder))  # another response inside a's, on a's lane
    (end_a, _, _), (end_b, _, _) = await finish(broken), await finish(other)
    assert end_a.kind == "socket" and end_a.error is not None
    assert end_a.error.code == "bad_event"
    assert end_b.kind == "completed"  # the other lane finished on the same socket
    await fake.wait_open_sockets(0)  # then the socket went: one lane's state was unknown
    await a.say("a again")
    assert "previous_response_id" not in creates_of(fake, "a again")[0]
    await proxy.registry.aclose()


async def test_max_sockets_caps_shared_sockets_too(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, lanes_per_socket=1, max_sockets=2)
    for name in ("a", "b", "c"):
        await Session(proxy, name).say("hello")
        await trio.sleep(1)
    assert fake.sockets_opened == 3
    await fake.wait_open_sockets(2)  # the least recently used went when the third opened
    assert proxy.registry.pooled == 2 and proxy.registry.evictions["lru"] == 1
    assert proxy.registry.lanes.moved["lru"] == 1  # its session starts afresh next turn
    await proxy.registry.aclose()


async def test_shutdown_refuses_new_lane_turns_and_closes_shared_sockets_once_idle(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    a, b = await seated(proxy)
    running = await start(proxy, "a", [*a.history, user("two\nfake: slow 1\nfake: deltas 5")])
    started = trio.current_time()
    async with trio.open_nursery() as group:
        group.start_soon(proxy.registry.aclose, 100)
        await trio.sleep(0.5)
        with pytest.raises(ApiError) as refused:
            await start(proxy, "b", [*b.history, user("during shutdown")])
        assert refused.value.code == "shutting_down"
        end, _, _ = await finish(running)
    assert end.kind == "completed"  # the running turn finished, then the socket went
    assert trio.current_time() - started < 20 and proxy.registry.live == 0


async def test_a_connection_error_on_the_default_lane_ends_its_turns_with_its_own_code(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    a, b = await seated(proxy)
    streaming = await start(proxy, "a", [*a.history, user("two\nfake: slow 1\nfake: deltas 5")])
    error = {
        "type": "error",
        "status": 429,
        "error": {"code": "rate_limit_exceeded", "message": "slow down", "type": "requests"},
    }
    await fake.send_stray(json.dumps(error))  # connection-scoped: no stream_id
    end, _, _ = await finish(streaming)
    assert end.kind == "socket" and end.error is not None
    assert end.error.code == "rate_limit_exceeded"  # the upstream's own error, not ours
    await b.say("two")  # the group keeps its lanes: a new shared socket
    assert "stream_id" in fake.creates()[-1].message and fake.sockets_opened == 2
    await proxy.registry.aclose()


async def test_max_sockets_counts_shared_sockets_for_every_request(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A socket of its own (a WebSocket client's, a laneless group's) leased at the cap makes
    room by closing an idle shared one."""
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, max_sockets=1)
    await Session(proxy, "named").say("hello")
    conn = await proxy.registry.lease("own", proxy.settings.upstream_ws, headers("own"))
    assert not conn.one_turn  # pooled: room was made
    await fake.wait_open_sockets(1)
    assert proxy.registry.pooled == 1 and proxy.registry.evictions["lru"] == 1
    proxy.registry.give_back(conn)
    await proxy.registry.aclose()


async def finish_plain(proxy: Proxy, items: list[Any]) -> tuple[TurnEnd, list[Any]]:
    body = {"model": "m", "input": items}
    auth = [("authorization", "Bearer sk-test-key")]
    end, output, _ = await finish(await proxy.open_turn(body, auth, api_target(proxy.settings)))
    return end, output


async def test_an_http_body_may_not_name_a_lane(nursery: trio.Nursery) -> None:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake, lanes=True)
    async with server.client() as client:
        reply = await post(client, request_body([user("a")], stream_id="tp0"))
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "stream_id"
    assert reply.json()["error"]["code"] == "unknown_parameter"
    assert not fake.creates()


async def test_a_client_leaving_releases_its_buffered_bytes_at_once(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    await Session(proxy, "a").say("one")
    stuck = await start(proxy, "a", [user("fake: slow 1\nfake: long 200")])
    await trio.sleep(5)
    assert proxy.registry.buffered_bytes > 0  # events waiting for a client that reads nothing
    await stuck.aclose()
    assert proxy.registry.buffered_bytes == 0  # although its response still runs out upstream
    await trio.sleep(1)  # the socket's task hears of it
    assert proxy.registry.busy == 0 and proxy.registry.buffered_bytes == 0
    await proxy.registry.aclose()


async def test_conversations_that_name_no_session_are_found_by_content_on_their_lanes(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The SDK's default: no session header, no cache key. Each conversation still gets a
    seat of its own (never another conversation's), found again by what it continues."""
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake)
    auth = [("authorization", "Bearer sk-test-key")]
    histories: dict[str, list[Any]] = {"x": [], "y": []}
    for step in range(3):
        for name, history in histories.items():
            history.append(user(f"{name} {step}"))
            body = {"model": "m", "input": history}
            stream = await proxy.open_turn(body, auth, api_target(proxy.settings))
            end, output, events = await finish(stream)
            assert end.kind == "completed" and all("stream_id" not in e for e in events)
            history.extend(output)
    assert fake.sockets_opened == 1
    for name in histories:
        creates = [creates_of(fake, f"{name} {step}")[0] for step in range(3)]
        assert len({c["stream_id"] for c in creates}) == 1  # one lane per conversation
        assert [len(c["input"]) for c in creates] == [1, 1, 1]  # suffixes after the first
    x_lane = creates_of(fake, "x 0")[0]["stream_id"]
    assert x_lane != creates_of(fake, "y 0")[0]["stream_id"]
    assert proxy.placements["inferred"] == 4 and proxy.registry.stats()["seats"] == 2
    await proxy.registry.aclose()


async def test_a_group_without_lanes_tries_them_again_after_the_cool_down(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    fake.lanes_enabled = False
    proxy = await laned_proxy(nursery, fake, fallback_cooldown=300)
    await Session(proxy, "s1").say("one")
    assert proxy.retries["invalid_stream_id"] == 1
    fake.lanes_enabled = True  # the upstream learnt lanes
    await Session(proxy, "s2").say("two")
    assert "stream_id" not in fake.creates()[-1].message  # still in its cool-down
    await trio.sleep(301)
    await Session(proxy, "s3").say("three")
    assert fake.creates()[-1].message.get("stream_id") == "tp0"
    await proxy.registry.aclose()


async def test_one_off_requests_without_a_session_reuse_seats_once_sockets_are_full(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Seats (and sockets) grow with requests at once, not with requests made: once the
    group's sockets have no free lane, a request that continues nothing takes the least
    recently used idle seat, as it would take an idle socket without lanes."""
    fake = FakeUpstream()
    proxy = await laned_proxy(nursery, fake, lanes_per_socket=2)
    for n in range(6):
        end, _ = await finish_plain(proxy, [user(f"one-off {n}")])
        assert end.kind == "completed"
    assert fake.sockets_opened == 1 and proxy.registry.stats()["seats"] == 2
    assert proxy.placements["warm"] == 4


async def test_a_laneless_retry_continues_on_the_sessions_own_socket(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    fake.lanes_enabled = False
    proxy = await laned_proxy(nursery, fake, fallback_cooldown=300)
    s = Session(proxy, "s1")
    await s.say("one")
    await trio.sleep(301)  # lanes are tried again, refused again
    await s.say("two")
    assert proxy.retries["invalid_stream_id"] == 2
    assert fake.creates()[-1].message["input"] == [user("two")]  # a suffix on its own socket
    await proxy.registry.aclose()


def test_codex_thread_id_keys_a_session_but_not_its_credential_group() -> None:
    def upstream(session: str, thread: str) -> Any:
        sent = [*headers(session), ("thread-id", thread)]
        return api_target(Settings(upstream="ws://fake/v1/responses")).upstream(sent, None)

    a, b, c = upstream("s1", "t1"), upstream("s1", "t2"), upstream("s2", "t3")
    assert a.key != b.key  # two conversations of one session id: two pool keys
    assert a.group == b.group == c.group  # one credential: one group, so lanes can share
    assert a.session == "header"
    assert upstream("s1", " t1 ").key == a.key  # the value as it goes upstream, trimmed

    def thread_only(thread: str) -> Any:
        sent = [("authorization", "Bearer sk-test-key"), ("thread-id", thread)]
        return api_target(Settings(upstream="ws://fake/v1/responses")).upstream(sent, None)

    t1, t2 = thread_only("t1"), thread_only("t2")
    assert t1.session == "thread" and t1.key is not None and t1.key != t2.key  # a session
    assert t1.group == t2.group == a.group


def test_managed_mode_passes_codex_thread_id_upstream() -> None:
    kept = keys.managed_own([("thread-id", "t1"), ("x-secret-org", "o")], ())
    assert kept == [("thread-id", "t1")]


class SlowUplink(trio.abc.Stream):
    """The proxy's side of an upstream stream whose sending side moves 200 KB a second."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(len(data) / 200_000)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_long_message_does_not_stall_the_other_lanes(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """One session sends a 900 KB request (4 fragments, 4.5 s on this uplink) while another's
    response streams on the same socket: the socket's task reads between fragments, so the
    streaming session's events wait at most a fragment's time, not the whole send."""
    fake = FakeUpstream()
    config = Settings(upstream="ws://fake/v1/responses", lanes=True, permessage_deflate=False)
    registry = Registry(config, memory_connector(fake, deflate=False, wrap=SlowUplink))
    await nursery.start(registry.run)
    proxy = Proxy(config, registry)
    streaming = await start(proxy, "a", [user("fake: slow 0.05\nfake: long 100")])
    arrivals: list[float] = []

    async def read_a() -> None:
        async for _ in streaming:
            arrivals.append(trio.current_time())

    nursery.start_soon(read_a)
    await trio.sleep(0.2)
    sent_at = trio.current_time()
    end, _, _ = await finish(await start(proxy, "b", [user("x" * 900_000)]))
    assert end.kind == "completed"
    assert trio.current_time() - sent_at >= 4.0  # the send itself took the uplink's time
    during = [t for t in arrivals if sent_at <= t <= sent_at + 4.0]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    # At most one fragment's send (256 KiB: 1.3 s here) between two of them, not the 4.5 s
    # of the whole message.
    assert during and max(gaps) < 1.5, (len(during), max(gaps, default=None))
    assert {c.socket for c in fake.creates()} == {1}  # one shared socket, two lanes
    await registry.aclose()


async def test_a_message_too_large_ends_only_its_own_turn_as_too_large(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The upstream closes a shared socket with 1009 on one session's message: that turn is
    413 `upstream_message_too_large` (not sent again: with the HTTP fallback off here), the
    other lane's turn ends as a closed socket, not as a request too large."""
    fake = FakeUpstream()  # the in-memory server takes messages up to 1 MiB
    proxy = await laned_proxy(nursery, fake, http_fallback=False, permessage_deflate=False)
    streaming = await start(proxy, "a", [user("fake: slow 0.05\nfake: long 100")])
    big = await start(proxy, "b", [user("x" * 1_200_000)])
    assert big.end.error is not None and big.end.error.status == 413
    assert big.end.error.code == "upstream_message_too_large"
    end, _, _ = await finish(streaming)
    assert end.error is not None and end.error.code == "upstream_connection_closed"
    assert len(fake.creates()) == 1  # the large one never reached a second socket
    await proxy.registry.aclose()


async def test_a_close_for_a_message_still_going_out_is_that_messages(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Over a slow uplink the upstream reads past its limit and closes (1009) while the rest of
    a 3 MB request is still going out; the socket's task hears the close between fragments.
    That request is the one too large, not the last one sent before it."""
    fake = FakeUpstream()  # the in-memory server takes messages up to 1 MiB
    config = Settings(
        upstream="ws://fake/v1/responses",
        lanes=True,
        permessage_deflate=False,
        http_fallback=False,
    )
    registry = Registry(config, memory_connector(fake, deflate=False, wrap=SlowUplink))
    await nursery.start(registry.run)
    proxy = Proxy(config, registry)
    streaming = await start(proxy, "a", [user("fake: slow 0.05\nfake: long 1000")])
    big = await start(proxy, "b", [user("x" * 3_000_000)])
    assert big.end.error is not None and big.end.error.code == "upstream_message_too_large"
    end, _, _ = await finish(streaming)
    assert end.error is not None and end.error.code == "upstream_connection_closed"
    await registry.aclose()


async def test_an_event_for_a_request_still_being_sent_ends_that_turn_alone(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Between the fragments of a long message the socket's task reads the other lanes; an
    event on the lane whose request is not yet whole answers nothing sent: that turn is cut
    (nothing reached its client, so it is sent again on a fresh socket), the socket takes no
    new turns, and the other lane finishes on it."""
    fake = FakeUpstream()
    config = Settings(upstream="ws://fake/v1/responses", lanes=True, permessage_deflate=False)
    registry = Registry(config, memory_connector(fake, deflate=False, wrap=SlowUplink))
    await nursery.start(registry.run)
    proxy = Proxy(config, registry)
    a, b = await seated(proxy)
    lane = creates_of(fake, "a one")[0]["stream_id"]
    other = await start(proxy, "b", [*b.history, user("fake: slow 0.05\nfake: long 100")])
    ends: list[TurnEnd] = []

    async def send_large() -> None:
        ends.append((await finish(await start(proxy, "a", [*a.history, user("x" * 900_000)])))[0])

    async with trio.open_nursery() as sending:
        sending.start_soon(send_large)
        await trio.sleep(1.5)  # the first of four fragments is out
        early = {"type": "response.created", "stream_id": lane, "response": {"id": "resp_z"}}
        await fake.send_stray(json.dumps(early))
    assert ends[0].kind == "completed"
    assert proxy.retries["socket"] == 1 and fake.sockets_opened == 2
    end, _, _ = await finish(other)
    assert end.kind == "completed"
    assert [c.socket for c in fake.creates()][-3:] == [1, 1, 2]  # b's, a's cut one, a's again
    await registry.aclose()
