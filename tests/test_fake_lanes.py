"""The fake upstream's lanes (`stream_id`) and steering (`response.steer`), as OpenAI documents
them for WebSocket mode; every event it sends validates against the SDK's server event types."""

from __future__ import annotations

import asyncio
import json
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pydantic
import pytest
import trio
from openai.types.responses.responses_server_event import ResponsesServerEvent
from trio_websocket import WebSocketConnection, open_websocket_url

from trioproxy.fake import FakeUpstream, Reply

AUTH = [(b"authorization", b"Bearer sk-test")]
TERMINALS = ("response.completed", "response.failed", "response.incomplete", "error")
SLOW = "fake: slow 0.01\nfake: long 30"  # about 20 events, 10 ms apart: `w0 ... w29`
VERY_SLOW = "fake: slow 0.05\nfake: long 300"  # seconds of stream: time to steer it

ADAPTER: pydantic.TypeAdapter[ResponsesServerEvent] = pydantic.TypeAdapter(ResponsesServerEvent)
# The SDK's WebSocket event classes by type, so a failure names the class that refused it.
WS_BY_TYPE: dict[str, type[pydantic.BaseModel]] = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponsesServerEvent)[0])
}


def check(event: dict[str, Any], *, input_echo_valid: bool = True) -> None:
    """The event is one of the SDK's WebSocket server events, with no field it lacks.

    `input_echo_valid=False`: a `response.steer.failed` for invalid input returns that input
    as it was sent, which the SDK's steering input type need not accept; the rest must.
    """
    cls = WS_BY_TYPE[event["type"]]
    assert "stream_id" not in event or "stream_id" in cls.model_fields
    if event["type"] == "error" or event["type"].startswith("response.steer"):  # new here: exact
        assert set(event) <= set(cls.model_fields), set(event) - set(cls.model_fields)
    if not input_echo_valid:
        event = {**event, "steer": {**event["steer"], "input": "(as sent)"}}
    cls.model_validate(event)
    assert ADAPTER.validate_python(event).type == event["type"]


class Client:
    """A raw WebSocket client that checks every event it reads."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def send(self, **message: Any) -> None:
        await self.ws.send_message(json.dumps(message))

    async def create(self, text: Any, **extra: Any) -> None:
        await self.send(type="response.create", model="m", input=text, **extra)

    async def steer(self, target: str, text: Any) -> None:
        await self.send(type="response.steer", previous_response_id=target, input=text)

    async def next(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await self.ws.get_message())
        invalid_echo = event.get("error", {}).get("code") == "invalid_input"
        check(event, input_echo_valid=not invalid_echo)
        self.seen.append(event)
        return event

    async def until(self, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Events up to and including the first that is `done`."""
        out = []
        with trio.fail_after(20):
            while True:
                out.append(await self.next())
                if done(out[-1]):
                    return out

    async def terminals(self, count: int) -> list[dict[str, Any]]:
        """Events up to the `count`th terminal (errors included)."""
        seen = 0

        def done(event: dict[str, Any]) -> bool:
            nonlocal seen
            seen += event["type"] in TERMINALS
            return seen == count

        return await self.until(done)


@asynccontextmanager
async def connect(fake: FakeUpstream) -> AsyncIterator[Client]:
    async with open_websocket_url(fake.url, extra_headers=AUTH) as ws:
        yield Client(ws)


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def index(events: list[dict[str, Any]], kind: str, stream_id: str | None = None) -> int:
    return next(
        i for i, e in enumerate(events) if e["type"] == kind and e.get("stream_id") == stream_id
    )


# -- lanes ------------------------------------------------------------------------------------


async def test_two_named_lanes_interleave_and_every_event_echoes_its_lane(
    fake: FakeUpstream,
) -> None:
    async with connect(fake) as client:
        await client.create(SLOW, stream_id="a")
        await client.create("fake: slow 0.01\nfake: long 31", stream_id="b.2-x_Y")
        events = await client.terminals(2)
    lanes = {e["stream_id"] for e in events}
    assert lanes == {"a", "b.2-x_Y"}  # every event carries its lane, terminals too
    # Interleaved: the second lane started before the first finished.
    assert index(events, "response.created", "b.2-x_Y") < index(events, "response.completed", "a")
    done = {e["stream_id"]: e["response"] for e in of(events, "response.completed")}
    assert done["a"]["output"][-1]["content"][0]["text"].endswith(" w29")
    assert done["b.2-x_Y"]["output"][-1]["content"][0]["text"].endswith(" w30")
    for lane, response in done.items():
        mine = [e for e in events if e["stream_id"] == lane]
        assert [e["sequence_number"] for e in mine] == list(range(len(mine)))
        assert fake.response_lanes[response["id"]] == lane
    assert fake.stream_ids[1] == ["a", "b.2-x_Y"]
    assert fake.max_active == 2
    assert [c.message["stream_id"] for c in fake.creates()] == ["a", "b.2-x_Y"]


async def test_one_lane_runs_its_requests_fifo_without_overlap(fake: FakeUpstream) -> None:
    async with connect(fake) as client:
        await client.create(SLOW, stream_id="lane")
        await client.create("second", stream_id="lane")
        events = await client.terminals(2)
    assert not of(events, "error")
    types = [e["type"] for e in events]
    first_done = types.index("response.completed")
    assert types.count("response.created") == 2
    assert types.index("response.created", 1) == first_done + 1  # queued until the terminal
    texts = [
        e["response"]["output"][-1]["content"][0]["text"] for e in of(events, "response.completed")
    ]
    assert texts[0].endswith(" w29") and texts[1] == "You said: second"
    assert {e["stream_id"] for e in events} == {"lane"}
    assert fake.max_active == 1


async def test_the_default_lane_queues_too_and_its_events_carry_no_lane(
    fake: FakeUpstream,
) -> None:
    async with connect(fake) as client:
        await client.create(f"first\n{SLOW}")
        await client.create("second")
        events = await client.terminals(2)
    assert not any("stream_id" in e for e in events)
    types = [e["type"] for e in events]
    assert [t for t in types if t in TERMINALS] == ["response.completed", "response.completed"]
    assert types.index("response.created", 1) == types.index("response.completed") + 1
    assert fake.stream_ids[1] == []


async def test_queue_creates_false_keeps_the_old_refusal(fake: FakeUpstream) -> None:
    fake.queue_creates = False
    async with connect(fake) as client:
        await client.create(f"first\n{SLOW}")
        await client.create("second", stream_id="other")
        events = await client.terminals(2)
    error = of(events, "error")[0]
    assert (error["status"], error["error"]["code"]) == (409, "response_already_in_flight")
    assert error["stream_id"] == "other"
    assert len(of(events, "response.created")) == 1


async def test_a_lane_forks_from_a_response_made_on_another(fake: FakeUpstream) -> None:
    async with connect(fake) as client:
        await client.create("root", stream_id="a", store=False)
        root = (await client.terminals(1))[-1]["response"]["id"]
        await client.create("fork", stream_id="b", store=False, previous_response_id=root)
        await client.create("more", store=False, previous_response_id=root)  # default lane
        events = await client.terminals(2)
    done = of(events, "response.completed")
    assert [e.get("stream_id") for e in done] in (["b", None], [None, "b"])
    for event in done:
        assert event["response"]["previous_response_id"] == root
        assert event["response"]["usage"]["input_tokens_details"]["cached_tokens"] > 0


async def test_a_33rd_named_lane_is_refused_and_the_request_not_run(fake: FakeUpstream) -> None:
    async with connect(fake) as client:
        for n in range(32):
            await client.create(f"n{n}", stream_id=f"lane-{n}")
        events = await client.terminals(32)
        assert len(of(events, "response.completed")) == 32
        await client.create("one too many", stream_id="lane-32")
        error = (await client.terminals(1))[-1]
        assert error["type"] == "error" and error["stream_id"] == "lane-32"
        assert (error["status"], error["error"]["code"]) == (400, "websocket_stream_limit_reached")
        await client.create("again", stream_id="lane-7")  # a known id still works
        await client.create("default")  # the default lane does not count
        after = await client.terminals(2)
    assert len(of(after, "response.completed")) == 2
    assert len(fake.stream_ids[1]) == 32 and "lane-32" not in fake.stream_ids[1]
    assert len(fake.response_lanes) == 34  # the refused create never ran


@pytest.mark.parametrize(
    "stream_id", ["", "has space", "x" * 257, "é", "a/b", 5, ["a"], True, {"id": "a"}]
)
async def test_an_invalid_stream_id_is_refused(fake: FakeUpstream, stream_id: Any) -> None:
    async with connect(fake) as client:
        await client.create("hi", stream_id=stream_id)
        error = (await client.terminals(1))[-1]
        await client.create("fine", stream_id="x" * 256)
        ok = (await client.terminals(1))[-1]
    assert error["type"] == "error" and error["status"] == 400
    assert error["error"]["code"] == "invalid_stream_id"
    assert error["error"]["type"] == "invalid_request_error"
    assert error.get("stream_id") == (stream_id if isinstance(stream_id, str) else None)
    assert ok["type"] == "response.completed" and ok["stream_id"] == "x" * 256
    assert len(fake.response_lanes) == 1


async def test_17_creates_run_16_at_once_and_all_complete(fake: FakeUpstream) -> None:
    async with connect(fake) as client:
        for n in range(17):
            await client.create(f"n{n}\nfake: slow 0.02\nfake: long 12", stream_id=f"l{n}")
        events = await client.terminals(17)
    assert len(of(events, "response.completed")) == 17
    first_end = next(i for i, e in enumerate(events) if e["type"] in TERMINALS)
    assert len(of(events[:first_end], "response.created")) == 16  # the 17th waited
    assert fake.max_active == 16


async def test_unknown_events_are_answered_on_the_default_lane(fake: FakeUpstream) -> None:
    async with connect(fake) as client:
        await client.send(type="response.cancel", stream_id="a")
        error = (await client.terminals(1))[-1]
    assert error["error"]["code"] == "unknown_event" and "stream_id" not in error


# -- steering -----------------------------------------------------------------------------------


async def test_steering_a_running_response_ends_it_and_starts_a_successor(
    fake: FakeUpstream,
) -> None:
    async with connect(fake) as client:
        await client.create(f"tell me a story\n{VERY_SLOW}", stream_id="s", store=False)
        opening = await client.until(lambda e: e["type"] == "response.output_text.delta")
        target = opening[0]["response"]["id"]
        await client.steer(target, "make it short")
        events = await client.terminals(2)
        assert all(e["stream_id"] == "s" for e in opening + events)
        accepted, ended = events[0], events[1]
        assert accepted["type"] == "response.steer.accepted"
        assert accepted["steer"]["previous_response_id"] == target
        assert accepted["steer"]["id"].startswith("steer_")
        assert ended["type"] == "response.incomplete"
        steered = ended["response"]
        assert (steered["id"], steered["status"]) == (target, "incomplete")
        assert steered["incomplete_details"] == {"reason": "steered"}
        partial = steered["output"][-1]
        assert partial["status"] == "incomplete"
        streamed = "".join(
            e["delta"] for e in of(opening + events[:1], "response.output_text.delta")
        )
        assert partial["content"][0]["text"] == streamed
        numbers = [e["sequence_number"] for e in [*opening, accepted, ended]]
        assert numbers == list(range(len(numbers)))  # the steer event took its place in line
        successor = events[2]
        assert successor["type"] == "response.created"
        follow = successor["response"]
        assert follow["previous_response_id"] == target and follow["id"] != target
        done = events[-1]
        assert done["type"] == "response.completed" and done["response"]["id"] == follow["id"]
        assert done["response"]["output"][-1]["content"][0]["text"] == "You said: make it short"
        # Both are in the socket's cache, shared by its lanes; steering again is too late.
        await client.create("next", stream_id="other", store=False, previous_response_id=target)
        await client.steer(target, "too late")
        tail = await client.until(lambda e: e["type"] == "response.steer.failed")
        failed = tail[-1]
        assert failed["error"]["code"] == "response_already_completed"
        assert failed["stream_id"] == "s" and "id" not in failed["steer"]
        assert failed["steer"] == {"input": "too late", "previous_response_id": target}
        forked = (await client.terminals(1))[-1]
    assert forked["type"] == "response.completed" and forked["stream_id"] == "other"
    assert fake.response_lanes[follow["id"]] == "s"
    assert len(fake.creates()) == 2


async def test_a_steered_successor_runs_before_the_lanes_next_request(
    fake: FakeUpstream,
) -> None:
    async with connect(fake) as client:
        await client.create(VERY_SLOW, stream_id="s")
        await client.create("queued", stream_id="s")
        target = (await client.until(lambda e: True))[0]["response"]["id"]
        assert fake.steers() == [] and fake.active_responses == 1
        await client.steer(target, "steer")
        events = await client.terminals(3)
    assert [e["type"] for e in events if e["type"] in TERMINALS] == [
        "response.incomplete",
        "response.completed",
        "response.completed",
    ]
    texts = [e["response"]["output"][-1]["content"][0]["text"] for e in events[-1:]]
    assert texts == ["You said: queued"]
    created = of(events, "response.created")
    assert created[0]["response"]["previous_response_id"] == target
    assert created[1]["response"]["previous_response_id"] is None
    assert [r.message["input"] for r in fake.steers()] == ["steer"]
    assert fake.max_active == 1


async def test_steering_a_reasoning_model_mid_summary(fake: FakeUpstream) -> None:
    include = ["reasoning.encrypted_content"]
    async with connect(fake) as client:
        await client.send(
            type="response.create", model="gpt-5", input=VERY_SLOW, include=include, stream_id="r"
        )
        opening = await client.until(lambda e: e["type"] == "response.reasoning_summary_text.delta")
        await client.steer(opening[0]["response"]["id"], "stop thinking")
        events = await client.terminals(2)
    steered = events[1]["response"]
    assert steered["incomplete_details"] == {"reason": "steered"}
    reasoning = steered["output"][0]
    assert (
        reasoning["type"] == "reasoning" and reasoning["summary"][0]["text"] == opening[-1]["delta"]
    )
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["model"] == "gpt-5"  # settings inherited
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]


async def test_steering_an_unknown_response_fails(fake: FakeUpstream) -> None:
    async with connect(fake) as client:
        await client.steer("resp_nope", [{"role": "user", "content": "hi"}])
        failed = (await client.until(lambda e: True))[-1]
    assert failed["type"] == "response.steer.failed" and "stream_id" not in failed
    assert failed["error"] == {
        "code": "response_not_found",
        "message": failed["error"]["message"],
        "type": "invalid_request_error",
    }
    assert failed["steer"]["previous_response_id"] == "resp_nope"


@pytest.mark.parametrize(
    ("extra", "steer_input"),
    [
        ({"stream_id": "s"}, "hi"),  # the target decides the lane: the field is refused
        ({"metadata": {}}, "hi"),
        ({}, []),
        ({}, 42),
        ({}, [{"role": "assistant", "content": "hi"}]),
        ({}, [{"type": "function_call_output", "call_id": "c", "output": "x"}]),
        ({}, [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]),
        ({}, [{"role": "user", "content": "hi", "id": "msg_1"}]),
    ],
)
async def test_invalid_steering_is_refused_and_the_response_runs_on(
    fake: FakeUpstream, extra: dict[str, Any], steer_input: Any
) -> None:
    async with connect(fake) as client:
        await client.create("fake: slow 0.02\nfake: long 90", stream_id="s")  # about 0.7 s
        opening = await client.until(lambda e: e["type"] == "response.created")
        target = opening[0]["response"]["id"]
        await client.send(
            type="response.steer", previous_response_id=target, input=steer_input, **extra
        )
        events = await client.terminals(1)
    failed = of(events, "response.steer.failed")
    assert len(failed) == 1 and failed[0]["error"]["code"] == "invalid_input"
    assert failed[0]["stream_id"] == "s" and failed[0]["steer"]["input"] == steer_input
    assert events[-1]["type"] == "response.completed"  # not steered
    assert not of(events, "response.created")


async def test_a_valid_steer_input_list_is_accepted(fake: FakeUpstream) -> None:
    parts = [
        {"type": "input_text", "text": "look at this"},
        {"type": "input_image", "image_url": "https://example.com/x.png", "detail": "auto"},
    ]
    async with connect(fake) as client:
        await client.create(f"story\n{VERY_SLOW}")
        target = (await client.until(lambda e: True))[0]["response"]["id"]
        await client.steer(
            target,
            [
                {"role": "user", "content": parts},
                {"type": "message", "role": "user", "content": "and"},
            ],
        )
        events = await client.terminals(2)
    assert [e["type"] for e in events[:3]] == [
        "response.steer.accepted",
        "response.incomplete",
        "response.created",
    ]
    assert not any("stream_id" in e for e in events)
    assert events[-1]["response"]["output"][-1]["content"][0]["text"] == "You said: and"


async def test_steering_a_tool_call_waits_for_its_output(fake: FakeUpstream) -> None:
    """Once a function call has begun, steering cannot cut it short: the response completes,
    `response.steer.pending` names the output it waits for, and the client's continuation
    gets the steering input first, in submission order."""
    fake.queue(replace(Reply.call("exec_command", {"cmd": "ls"}), delay=0.05, deltas=20))
    async with connect(fake) as client:
        await client.create("run ls", stream_id="t")
        opening = await client.until(lambda e: e["type"] == "response.output_item.added")
        target = opening[0]["response"]["id"]
        await client.steer(target, "first")
        await client.steer(target, "second")
        events = await client.until(lambda e: e["type"] == "response.completed")
        pending = [await client.next(), await client.next()]
        accepted = of(events, "response.steer.accepted")
        assert len(accepted) == 2 and not of(events, "response.incomplete")
        call = events[-1]["response"]["output"][-1]
        assert call["type"] == "function_call" and call["status"] == "completed"
        stub = {"type": "function_call_output", "call_id": call["call_id"], "name": "exec_command"}
        for note, ack in zip(pending, accepted, strict=True):
            assert note["type"] == "response.steer.pending" and note["stream_id"] == "t"
            assert note["reason"] == "waiting_for_required_input"
            assert note["required_input"] == [stub]
            assert note["steer"] == ack["steer"]
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "a b"}
        await client.create([output], stream_id="t", previous_response_id=target)
        done = (await client.terminals(1))[-1]
    assert done["response"]["output"][-1]["content"][0]["text"] == "The tool returned: a b"
    conversation = fake.stored[done["response"]["id"]]
    firsts = [item.get("content") for item in conversation[-4:-2]]
    assert firsts == ["first", "second"] and conversation[-2] == output


# -- the SDK's lane helper against the fake ----------------------------------------------------


async def test_the_sdks_websocket_session_runs_two_lanes_and_steers(fake: FakeUpstream) -> None:
    from openai import AsyncOpenAI
    from openai.lib.responses_websocket import (
        AsyncResponsesWebSocketSession,
        ResponsesWebSocketLimits,
    )

    limits = ResponsesWebSocketLimits(
        max_lanes=4,
        max_events_per_lane=2048,
        max_events=4096,
        max_bytes_per_lane=2**24,
        max_bytes=2**25,
    )

    async def run() -> tuple[Any, Any, Any, Any]:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{fake.port}/v1", api_key="sk-test")
        async with (
            client,
            client.responses.connect() as connection,
            AsyncResponsesWebSocketSession(connection, limits=limits) as session,
        ):
            a, b = session.lane("a"), session.lane("b")
            await a.send({"type": "response.create", "model": "m", "input": SLOW})
            await b.send({"type": "response.create", "model": "m", "input": "beta"})
            first, second = await asyncio.gather(a.get_final_response(), b.get_final_response())
            await a.send({"type": "response.create", "model": "m", "input": f"x\n{VERY_SLOW}"})
            created = await a.recv()
            assert created.type == "response.created"
            while (await a.recv()).type != "response.output_text.delta":
                pass
            steer = {"type": "response.steer", "previous_response_id": created.response.id}
            await a.send({**steer, "input": "y"})  # type: ignore[typeddict-item]
            steered = await a.get_final_response()
            while (await a.recv()).type != "response.created":
                pass
            successor = await a.get_final_response()
            return first, second, steered, successor

    first, second, steered, successor = await trio.to_thread.run_sync(lambda: asyncio.run(run()))
    assert first.status == second.status == "completed"
    assert first.output_text.endswith(" w29") and second.output_text == "You said: beta"
    assert steered.status == "incomplete" and steered.incomplete_details.reason == "steered"
    assert successor.status == "completed" and successor.previous_response_id == steered.id
    assert successor.output_text == "You said: y"
    assert fake.max_active == 2


async def test_a_refused_same_lane_continuation_evicts_its_parent_a_fork_does_not(
    fake: FakeUpstream,
) -> None:
    """responses_websocket README: "A same-lane continuation returning a 4xx or 5xx evicts
    its referenced cached parent; an errored cross-lane fork preserves the shared parent"."""
    async with connect(fake) as client:
        await client.create("parent", store=False, stream_id="a")
        parent = (await client.terminals(1))[-1]["response"]["id"]
        # A fork from lane b that fails: the parent stays.
        await client.create(
            "fake: error bad_fork 400", store=False, stream_id="b", previous_response_id=parent
        )
        assert (await client.terminals(1))[-1]["error"]["code"] == "bad_fork"
        await client.create("still there", store=False, stream_id="b", previous_response_id=parent)
        assert (await client.terminals(1))[-1]["type"] == "response.completed"
        # A same-lane continuation that fails: the parent is gone from the cache.
        await client.create(
            "fake: error bad_step 400", store=False, stream_id="a", previous_response_id=parent
        )
        assert (await client.terminals(1))[-1]["error"]["code"] == "bad_step"
        await client.create("again", store=False, stream_id="a", previous_response_id=parent)
        gone = (await client.terminals(1))[-1]
    assert gone["type"] == "error" and gone["error"]["code"] == "previous_response_not_found"


async def test_with_store_false_a_fork_must_come_before_its_lane_advances(
    fake: FakeUpstream,
) -> None:
    """responses_websocket README, "Forks": with store=False, wait for the fork lane's
    `response.in_progress` before advancing the source lane. The fake keeps a lane's latest
    response: once the lane continued from a response, a fork from it is refused; a stored
    response (store=True) any lane may still fork from."""
    async with connect(fake) as client:
        await client.create("root", stream_id="a", store=False)
        root = (await client.terminals(1))[-1]["response"]["id"]
        await client.create("early fork", stream_id="b", store=False, previous_response_id=root)
        assert (await client.terminals(1))[-1]["type"] == "response.completed"
        await client.create("next", stream_id="a", store=False, previous_response_id=root)
        latest = (await client.terminals(1))[-1]["response"]["id"]
        await client.create("late fork", stream_id="c", store=False, previous_response_id=root)
        late = (await client.terminals(1))[-1]
        assert late["type"] == "error"
        assert late["error"]["code"] == "previous_response_not_found"
        await client.create("fork latest", stream_id="c", store=False, previous_response_id=latest)
        assert (await client.terminals(1))[-1]["type"] == "response.completed"
        await client.create("stored", stream_id="a")
        stored = (await client.terminals(1))[-1]["response"]["id"]
        await client.create("on", stream_id="a", previous_response_id=stored)
        await client.terminals(1)
        await client.create("fork stored", stream_id="d", previous_response_id=stored)
        assert (await client.terminals(1))[-1]["type"] == "response.completed"
