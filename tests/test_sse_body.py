"""How the streaming body groups a turn's events into writes (trioproxy/http_turns.py `SseBody`).

A write downstream costs far more than an event, so a burst must leave as a few writes; but
the first event must never wait, and an event paced by the model must not wait for the next.
"""

from __future__ import annotations

import orjson
import trio
import trio.testing

from trioproxy import sse
from trioproxy.delta import plan_turn
from trioproxy.events import UpstreamEvent, parse_frame
from trioproxy.http_turns import SseBody
from trioproxy.turn import Turn, TurnEnd
from trioproxy.turnstream import TurnStream


def _event(n: int, kind: str = "response.output_text.delta") -> UpstreamEvent:
    return parse_frame(orjson.dumps({"type": kind, "sequence_number": n, "delta": f"d{n}"}))


def _turn() -> Turn:
    return Turn(plan_turn(None, {"model": "m", "input": "hi"}), 64)


async def _chunks(body: SseBody) -> list[tuple[float, bytes]]:
    return [(trio.current_time(), chunk) async for chunk in body]


def _expected(events: list[UpstreamEvent]) -> bytes:
    return b"".join(sse.encode(e.type, e.raw) for e in events)


async def test_a_burst_leaves_in_a_few_writes_and_the_first_event_alone() -> None:
    """Events arriving one per scheduler round, as the socket's pipeline delivers a burst."""
    turn = _turn()
    events = [_event(n) for n in range(40)]
    last = _event(40, "response.completed")

    async def upstream() -> None:
        for event in events:
            await turn.deliver(event)
            await trio.lowlevel.checkpoint()
        turn.finish(TurnEnd("completed", event=last))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        first = await turn.events.receive()
        chunks = await _chunks(SseBody(TurnStream(turn, first)))
    writes = [chunk for _, chunk in chunks]
    # Time to first event: the first write takes what is ready (the pipeline runs a round
    # or so ahead) but never waits for the rest of the burst.
    assert writes[0].startswith(_expected(events[:1]))
    assert writes[0].count(b"event: ") <= 3
    assert b"".join(writes) == _expected([*events, last])  # every event, in order, once
    assert len(writes) <= 4, f"{len(writes)} writes for a burst of {len(events)} events"


async def test_an_event_paced_by_the_model_is_not_held_for_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turn = _turn()
    events = [_event(n) for n in range(5)]
    delivered: list[float] = []

    async def upstream() -> None:
        for event in events:
            await turn.deliver(event)
            delivered.append(trio.current_time())
            await trio.sleep(0.05)  # a model's pace: 50 ms between tokens
        turn.finish(TurnEnd("completed", event=_event(5, "response.completed")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        first = await turn.events.receive()
        chunks = await _chunks(SseBody(TurnStream(turn, first)))
    # One write per paced event, each at the moment its event arrived: the mock clock moves
    # only when every task waits, so holding an event back for the next would show as a
    # later time.
    for (at, chunk), event, when in zip(chunks, events, delivered, strict=False):
        assert chunk == _expected([event])
        assert at == when


async def test_an_abandoned_body_cancels_its_turn() -> None:
    turn = _turn()
    await turn.deliver(_event(0))
    first = await turn.events.receive()
    body = SseBody(TurnStream(turn, first))
    assert await body.__anext__() == _expected([first])
    await body.aclose()
    assert turn.scope.cancel_called
