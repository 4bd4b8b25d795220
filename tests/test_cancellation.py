"""A client that goes away mid-turn: the turn is cancelled, its socket evicted and closed."""

from __future__ import annotations

import trio

from tests.conftest import AUTH, ProxyServer, post, request_body, start_proxy, user, wait_until
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
    with trio.fail_after(2):
        await server.fake.wait_open_sockets(0)
        await wait_until(lambda: server.registry.live == 0)
    assert server.registry.pooled == 0 and server.registry.tasks == 0
    assert server.registry.evictions["abandoned"] == 20
