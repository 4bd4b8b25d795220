"""A broken or hostile upstream: frames that are no turn's, event types that would forge SSE.

Real sockets to the fake upstream, which sends what it is told to between or before turns.
Whatever arrives, a client gets its own turn's answer or a clear error, never another
response's events, and the upstream conversation never silently loses a message.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.conftest import ProxyServer, nothing_left, post, request_body, sse_events, user
from trioproxy.events import TurnTracker, UpstreamEvent, parse_frame
from trioproxy.fake import Reply


def late(kind: str, rid: str) -> str:
    """A frame of response `rid` (an earlier one) of type `kind`."""
    response = {"id": rid, "object": "response", "status": "completed", "output": []}
    frames: dict[str, dict[str, Any]] = {
        "completed": {"type": "response.completed", "response": response},
        "created": {"type": "response.created", "response": {**response, "status": "queued"}},
        "delta": {
            "type": "response.output_text.delta",
            "item_id": "msg_old",
            "output_index": 0,
            "content_index": 0,
            "delta": "stale words",
        },
        "error": {
            "type": "error",
            "status": 500,
            "error": {"type": "server_error", "code": "server_error", "message": "late"},
        },
    }
    return json.dumps({**frames[kind], "sequence_number": 99})


async def two_turns(server: ProxyServer, between: Any) -> tuple[Any, Any]:
    async with server.client() as client:
        first = await post(client, request_body([user("a")]))
        await between(first.json()["id"])
        body = request_body([user("a"), *first.json()["output"], user("b")], stream=True)
        second = await post(client, body)
    return first, second


def assert_second_turn_is_its_own(server: ProxyServer, first: Any, second: Any) -> None:
    events = sse_events(second.text)
    assert second.status_code == 200
    assert events[0][0] == "response.created"
    completed = events[-1][1]["response"]
    assert events[-1][0] == "response.completed" and completed["id"] != first.json()["id"]
    assert completed["output"][0]["content"][0]["text"] == "You said: b"
    assert "stale words" not in second.text
    # The user's message reached the upstream: on a fresh socket, with the full input.
    last = server.fake.creates()[-1]
    assert last.socket == 2 and "previous_response_id" not in last.message
    assert [i.get("content") for i in last.message["input"]][-1] == [
        {"type": "input_text", "text": "b"}
    ]


@pytest.mark.parametrize("kind", ["completed", "created", "delta", "error"])
async def test_a_frame_on_an_idle_socket_makes_it_dirty(server: ProxyServer, kind: str) -> None:
    async def stray(rid: str) -> None:
        await server.fake.send_stray(late(kind, rid))
        await trio.sleep(0.05)  # let it land (if it has not, the next check catches it)

    first, second = await two_turns(server, stray)
    assert_second_turn_is_its_own(server, first, second)
    assert server.fake.sockets_opened == 2
    await nothing_left(server)
    assert server.registry.live == 1


@pytest.mark.parametrize("kind", ["completed", "created", "delta"])
async def test_a_late_frame_arriving_as_a_turn_begins_is_not_its_first_event(
    server: ProxyServer, kind: str
) -> None:
    """The race the idle check cannot see: the stray frame comes right after the request."""
    rid: list[str] = []

    async def arm(first_id: str) -> None:
        rid.append(first_id)
        server.fake.queue(Reply("text", text="You said: b", prelude=(late(kind, first_id),)))

    first, second = await two_turns(server, arm)
    assert_second_turn_is_its_own(server, first, second)
    await nothing_left(server)


def test_an_event_naming_another_response_mid_turn_is_refused() -> None:
    """Once this turn's response has begun, a frame of another response is an upstream fault
    (the socket task ends the turn with a clear error), never the other response's end."""
    tracker = TurnTracker(stale=["resp_old"])
    opened = {"type": "response.created", "response": {"id": "resp_new"}}
    with pytest.raises(ValueError):
        TurnTracker(stale=["resp_old"]).feed(event({**opened, "response": {"id": "resp_old"}}))
    assert tracker.feed(event(opened)) is None
    in_progress = {"type": "response.in_progress", "response": {"id": "resp_new"}}
    assert tracker.feed(event(in_progress)) is None
    with pytest.raises(ValueError):
        tracker.feed(event({"type": "response.completed", "response": {"id": "resp_other"}}))
    with pytest.raises(ValueError):
        tracker.feed(event({"type": "response.created", "response": {"id": "resp_other"}}))
    done = {"type": "response.completed", "response": {"id": "resp_new", "output": []}}
    assert tracker.feed(event(done)) == "completed"
    with pytest.raises(ValueError):
        TurnTracker().feed(event({"type": "response.output_text.delta", "delta": "x"}))
    # Events that are not a response's (a rate-limit notice, an error) may come first.
    assert TurnTracker().feed(event({"type": "codex.rate_limits"})) is None
    assert TurnTracker().feed(event({"type": "error", "error": {}})) == "error"


def event(data: dict[str, Any]) -> UpstreamEvent:
    return parse_frame(json.dumps(data))


@pytest.mark.parametrize("bad", ["response.completed\n\nevent: x", "a b", "", "x" * 200])
def test_event_types_outside_the_protocol_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_frame(json.dumps({"type": bad}))


async def test_a_notice_between_turns_that_concerns_no_response_keeps_the_socket(
    server: ProxyServer,
) -> None:
    """The Codex backend's `codex.rate_limits` (or any non-response notice) between turns is
    dropped: it must not turn every reuse into a full resend on a fresh socket."""

    async def notice(_: str) -> None:
        await server.fake.send_stray(json.dumps({"type": "codex.rate_limits", "plan_type": "pro"}))
        await trio.sleep(0.05)

    first, second = await two_turns(server, notice)
    assert second.status_code == 200 and server.fake.sockets_opened == 1
    assert server.fake.creates()[1].message["previous_response_id"] == first.json()["id"]
    await nothing_left(server)


async def test_a_leased_socket_goes_back_when_the_client_leaves_before_its_turn_is_sent(
    server: ProxyServer,
) -> None:
    """A large request is planned in a worker thread after its socket is leased; a client gone
    meanwhile must leave the socket idle as it was, not busy for good."""
    from trioproxy.targets import api_target

    proxy, registry = server.proxy, server.registry
    target = api_target(proxy.settings)
    headers = [("authorization", "Bearer sk-test-key"), ("session-id", "s1")]
    stream = await proxy.open_turn(request_body([user("hi")]), headers, target, request_bytes=9)
    async for _ in stream:
        pass
    big = request_body([user("x" * 1000) for _ in range(2000)])
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        await proxy.open_turn(big, headers, target, request_bytes=2_200_000)
    assert registry.busy == 0 and registry.idle == 1
    await nothing_left(server)
