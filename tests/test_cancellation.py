"""A client that goes away mid-turn: the turn is cancelled, its socket evicted and closed.

With lanes on (`TRIOPROXY_TEST_LANES=1`, run by `make test`) the socket is shared by other
sessions: the turn is cancelled and its session's lane evicted, the socket stays for the others,
and its lane is given again only once the cut response has run out upstream."""

from __future__ import annotations

import json
import random

import httpx
import trio

from tests.conftest import (
    AUTH,
    LANES,
    ProxyServer,
    post,
    request_body,
    start_proxy,
    user,
    wait_until,
)
from trioproxy.fake import FakeUpstream

LONG = " ".join(f"word{i}" for i in range(300))  # ~100 deltas


async def slow_server(nursery: trio.Nursery) -> ProxyServer:
    fake = FakeUpstream(event_delay=0.01)
    await nursery.start(fake.serve)
    return await start_proxy(nursery, fake)


async def test_disconnect_mid_stream_evicts_and_closes_within_a_second(
    nursery: trio.Nursery,
) -> None:
    server = await slow_server(nursery)
    registry, fake = server.registry, server.fake
    async with server.client() as client:
        # A completed turn first: the session has a pooled socket to lose.
        assert (await post(client, request_body([user("warm up")]), "s")).status_code == 200
        baseline_pooled = registry.pooled
        assert baseline_pooled == 1 and fake.open_sockets == 1
        body = request_body([user(LONG)], stream=True)
        async with client.stream(
            "POST", "/responses", json=body, headers={**AUTH, "session-id": "s"}
        ) as reply:
            seen = 0
            async for line in reply.aiter_lines():
                seen += line.startswith("event: response.output_text.delta")
                if seen == 5:
                    break  # leaving the block drops the connection mid-stream
    if LANES:
        with trio.fail_after(1):
            await wait_until(lambda: registry.stats()["seats"] == 0)
        assert registry.lanes.moved["turn_abandoned"] == 1 and fake.open_sockets == 1
        with trio.fail_after(5):  # the cut response runs out upstream; the socket stays
            await wait_until(lambda: registry.busy == 0, 5)
        async with server.client() as client:
            again = await post(client, request_body([user("after")]), "s")
        assert again.status_code == 200 and fake.sockets_opened == 1
        assert "previous_response_id" not in fake.creates()[-1].message
        return
    with trio.fail_after(1):
        await fake.wait_open_sockets(0)
        await wait_until(lambda: registry.live == 0)
    assert registry.pooled == 0 and registry.tasks == 0
    assert fake.creates()[-1].socket == 1
    # The session carries on: its next turn opens a fresh socket and sends the full input.
    async with server.client() as client:
        again = await post(client, request_body([user("after")]), "s")
    assert again.status_code == 200 and fake.sockets_opened == 2
    assert "previous_response_id" not in fake.creates()[-1].message


async def test_disconnect_while_waiting_for_the_first_event(nursery: trio.Nursery) -> None:
    fake = FakeUpstream(event_delay=5.0)  # the first event would take 5 s
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake)
    async with server.client() as client:
        with trio.move_on_after(0.3):
            await post(client, request_body([user("x")]), "s")
    if LANES:  # the lane is evicted; the response runs out on the shared socket
        with trio.fail_after(1):
            await wait_until(lambda: server.registry.stats()["seats"] == 0)
        assert server.registry.lanes.moved["turn_abandoned"] == 1
        assert server.registry.tasks == server.registry.live == 1
        return
    with trio.fail_after(1):
        await fake.wait_open_sockets(0)
        await wait_until(lambda: server.registry.live == 0)
    assert server.registry.tasks == 0 and server.registry.pooled == 0


async def test_many_disconnects_leave_nothing_behind(nursery: trio.Nursery) -> None:
    server = await slow_server(nursery)

    async def client_that_leaves(i: int) -> None:
        async with server.client() as client:
            body = request_body([user(LONG)], stream=True)
            async with client.stream(
                "POST", "/responses", json=body, headers={**AUTH, "session-id": f"s{i}"}
            ) as reply:
                n = 0
                async for _ in reply.aiter_lines():
                    n += 1
                    if n > 4 + i:
                        return

    async with trio.open_nursery() as inner:
        for i in range(20):
            inner.start_soon(client_that_leaves, i)
    if LANES:  # 20 lanes of one socket evicted; it stays, idle once the responses ran out
        registry = server.registry
        await wait_until(lambda: registry.busy == 0 and registry.stats()["seats"] == 0, 10)
        assert registry.lanes.moved["turn_abandoned"] == 20
        assert registry.live == registry.tasks == server.fake.open_sockets == 1
        return
    with trio.fail_after(2):
        await server.fake.wait_open_sockets(0)
        await wait_until(lambda: server.registry.live == 0)
    assert server.registry.pooled == 0 and server.registry.tasks == 0
    assert server.registry.evictions["abandoned"] == 20


STREAMS = 1_000
CONCURRENT = 100


async def test_a_thousand_streams_half_cut_at_random_points_leave_nothing_behind(
    nursery: trio.Nursery,
) -> None:
    """1,000 streaming turns, 100 at a time, on sessions of their own; a seeded random half
    is cut: before the response starts or after a random number of events. Afterwards no
    socket, task or upstream connection is left, and every stream that ran to its end is
    byte-identical to what the upstream sent for that response."""
    fake = FakeUpstream(event_delay=0.002, record_frames=True)
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake, max_sockets=STREAMS)
    rng = random.Random(20261124)
    plans = [rng.choice(["full", "cut"]) for _ in range(STREAMS)]
    cut_at = [rng.choice([0, *range(1, 14)]) for _ in range(STREAMS)]  # 0: before the response
    completed: list[tuple[str, list[str]]] = []
    cut = finished_early = 0
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
    slots = trio.Semaphore(CONCURRENT)

    async def one(n: int, client: httpx.AsyncClient) -> None:
        nonlocal cut, finished_early
        body = request_body([user(f"stream {n}: " + " ".join(["w"] * 30))], stream=True)
        headers = {**AUTH, "session-id": f"scale-{n}"}
        async with slots:
            if plans[n] == "cut" and cut_at[n] == 0:
                with trio.move_on_after(rng.random() * 0.01):
                    await client.post("/responses", json=body, headers=headers)
                    finished_early += 1  # done before the cut could land: its socket stays
                    return
                cut += 1
                return
            async with client.stream("POST", "/responses", json=body, headers=headers) as reply:
                frames: list[str] = []
                async for line in reply.aiter_lines():
                    if line.startswith("data: "):
                        frames.append(line[len("data: ") :])
                        if plans[n] == "cut" and len(frames) == cut_at[n]:
                            cut += 1
                            return  # leaving the block drops the connection mid-stream
            rid = json.loads(frames[0])["response"]["id"]
            completed.append((rid, frames))

    async with server.client(limits=limits) as client, trio.open_nursery() as streams:
        for n in range(STREAMS):
            streams.start_soon(one, n, client)

    registry = server.registry
    # What is left is exactly the completed sessions' idle sockets, each with its task and its
    # upstream connection; every cut turn's socket is gone.
    await wait_until(lambda: registry.busy == 0 and registry.tasks == registry.live, 10)
    with trio.fail_after(10):
        await fake.wait_open_sockets(registry.live)
    left = registry.live
    if LANES:  # the completed sessions' seats, on the shared sockets
        assert left == registry.idle == registry.pooled <= 32
        assert registry.stats()["seats"] == len(completed) + finished_early
    else:
        assert left == registry.idle == registry.pooled == len(completed) + finished_early
    await registry.aclose()
    assert registry.live == registry.tasks == 0
    with trio.fail_after(10):
        await fake.wait_open_sockets(0)
    assert registry.buffered_events == 0
    assert cut >= STREAMS * 0.4 and len(completed) >= STREAMS * 0.4, (cut, len(completed))
    assert fake.transcripts is not None
    for rid, frames in completed:
        if LANES:  # the same events, in order, less the proxy's lane name
            sent = [json.loads(frame) for frame in fake.transcripts[rid]]
            assert [json.loads(f) for f in frames] == [
                {k: v for k, v in event.items() if k != "stream_id"} for event in sent
            ]
            continue
        assert frames == fake.transcripts[rid]  # byte for byte, every event, in order
    print(
        f"\n{STREAMS} streams: {len(completed)} completed byte-identical, {cut} cut, "
        f"{finished_early} done before their cut; {left} idle pooled sockets left (one per "
        f"completed session); after close: sockets {registry.live}, tasks {registry.tasks}, "
        f"upstream open {fake.open_sockets}"
    )
