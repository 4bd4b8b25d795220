"""Clients that name no session, and reasoning models: the saving holds for real traffic.

The fake answers `gpt-5` as the live API does (a reasoning item whose ciphertext differs
between `output_item.done` and `response.completed`), and the `openai` SDK sends no session
header. These tests drive the real SDK through the proxy and read what reached the upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from openai import OpenAI

from tests.conftest import AUTH, ProxyServer, nothing_left, start_proxy, wait_until
from trioproxy.fake import FakeUpstream

REASONING = {"model": "gpt-5", "store": False, "include": ["reasoning.encrypted_content"]}


def sdk(server: ProxyServer, key: str = "sk-test-key", **headers: str) -> OpenAI:
    return OpenAI(
        base_url=server.base_url,
        api_key=key,
        default_headers=headers,
        max_retries=0,
        timeout=30,
    )


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


def final_output(client: OpenAI, history: list[Any], **extra: Any) -> tuple[str, list[Any]]:
    """One turn; the items an SDK user echoes: the final `response.output`."""
    response = client.responses.create(input=history, **{**REASONING, **extra})
    return response.id, [item.model_dump(exclude_none=True) for item in response.output]


def streamed_output(client: OpenAI, history: list[Any], **extra: Any) -> tuple[str, list[Any]]:
    """One streamed turn; the items Codex echoes: each `response.output_item.done`'s."""
    items: list[Any] = []
    with client.responses.stream(input=history, **{**REASONING, **extra}) as stream:
        for event in stream:
            if event.type == "response.output_item.done":
                items.append(event.item.model_dump(exclude_none=True))
        rid = stream.get_final_response().id
    return rid, items


def conversation(
    client: OpenAI, turns: int, echo: Callable[..., tuple[str, list[Any]]]
) -> list[list[Any]]:
    """`turns` turns of one conversation, each resending all of it; the outputs echoed."""
    history: list[Any] = [{"role": "user", "content": "turn 0"}]
    outputs = []
    for n in range(1, turns + 1):
        _, output = echo(client, history)
        outputs.append(output)
        history += [*output, {"role": "user", "content": f"turn {n}"}]
    return outputs


def assert_one_socket_of_suffixes(fake: FakeUpstream, turns: int) -> None:
    creates = fake.creates()
    assert fake.sockets_opened == 1
    assert len(creates) == turns
    assert "previous_response_id" not in creates[0].message
    for n, create in enumerate(creates[1:], start=1):
        assert create.message["previous_response_id"], n
        assert create.message["input"] == [{"role": "user", "content": f"turn {n}"}], n


async def test_sdk_echoing_the_final_output_of_a_reasoning_model_gets_suffixes(
    server: ProxyServer,
) -> None:
    """20 turns, no session header, the final `response.output` echoed: one upstream socket,
    19 suffix turns (reasoning items re-encrypted between stream and final response)."""
    outputs = await in_thread(lambda: conversation(sdk(server), 20, final_output))
    assert outputs[0][0]["type"] == "reasoning" and outputs[0][0]["encrypted_content"]
    assert_one_socket_of_suffixes(server.fake, 20)
    assert server.proxy.turns == {"full": 1, "suffix": 19}
    assert server.proxy.placements == {"new": 1, "inferred": 19}


async def test_sdk_echoing_the_streamed_items_gets_suffixes(server: ProxyServer) -> None:
    """As Codex does: the `output_item.done` forms, whose reasoning ciphertext is not the one
    `response.completed` holds."""
    outputs = await in_thread(lambda: conversation(sdk(server), 5, streamed_output))
    assert outputs[0][0]["type"] == "reasoning"
    assert_one_socket_of_suffixes(server.fake, 5)
    assert server.proxy.placements == {"new": 1, "inferred": 4}


async def test_the_streamed_and_final_forms_really_differ(server: ProxyServer) -> None:
    """The fake's re-encryption is what makes the two tests above mean something."""

    def run() -> tuple[list[Any], list[Any]]:
        client = sdk(server)
        streamed: list[Any] = []
        with client.responses.stream(input="hello", **REASONING) as stream:
            for event in stream:
                if event.type == "response.output_item.done":
                    streamed.append(event.item.model_dump(exclude_none=True))
            final = [i.model_dump(exclude_none=True) for i in stream.get_final_response().output]
        return streamed, final

    streamed, final = await in_thread(run)
    assert streamed[0]["id"] == final[0]["id"]
    assert streamed[0]["encrypted_content"] != final[0]["encrypted_content"]
    assert streamed[1] == final[1] and final[1]["phase"] == "final_answer"


async def test_an_edited_or_foreign_reasoning_item_goes_in_full(server: ProxyServer) -> None:
    def run() -> None:
        client = sdk(server)
        history: list[Any] = [{"role": "user", "content": "turn 0"}]
        _, output = final_output(client, history)
        forged = {**output[0], "encrypted_content": "gAAAAA" + "x" * 200}
        final_output(client, [*history, forged, *output[1:], {"role": "user", "content": "b"}])

    await in_thread(run)
    second = server.fake.creates()[1].message
    assert "previous_response_id" not in second and len(second["input"]) == 4
    assert server.proxy.turns == {"full": 2}
    # The unmatched request still took the warm socket rather than opening one.
    assert server.fake.sockets_opened == 1 and server.proxy.placements["warm"] == 1


async def test_unrelated_one_off_requests_share_a_warm_socket(server: ProxyServer) -> None:
    def run() -> None:
        client = sdk(server)
        for n in range(20):
            client.responses.create(model="gpt-test", input=f"one-off question {n}")

    await in_thread(run)
    assert server.fake.sockets_opened <= 2
    assert server.proxy.placements == {"new": 1, "warm": 19}
    assert [c.message.get("previous_response_id") for c in server.fake.creates()] == [None] * 20


async def test_concurrent_one_offs_never_wait_for_each_other(server: ProxyServer) -> None:
    """Three at once whose replies never finish: all three reach the upstream, each on a
    socket of its own (had they queued for one socket, only the first would)."""
    fake = server.fake

    async def stalled(n: int) -> None:
        async with server.client() as client:
            body = {"model": "gpt-test", "input": f"q{n}\nfake: stall 2"}
            await client.post("/responses", json=body, headers=AUTH)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(stalled, n)
        await wait_until(lambda: len(fake.creates()) == 3)
        assert {c.socket for c in fake.creates()} == {1, 2, 3}
        nursery.cancel_scope.cancel()
    await wait_until(lambda: server.registry.live == 0)  # the cut turns took their sockets
    async with server.client() as client:
        for n in range(2):
            body = {"model": "gpt-test", "input": f"after {n}"}
            assert (await client.post("/responses", json=body, headers=AUTH)).status_code == 200
    assert fake.sockets_opened == 4
    assert server.proxy.placements == {"new": 4, "warm": 1}
    await nothing_left(server)


async def test_two_api_keys_never_share_a_socket(server: ProxyServer) -> None:
    """The same conversation from another credential is not continued on the first's socket."""

    def run() -> None:
        history: list[Any] = [{"role": "user", "content": "shared words"}]
        _, output = final_output(sdk(server, "sk-key-one"), history)
        follow = [*history, *output, {"role": "user", "content": "next"}]
        final_output(sdk(server, "sk-key-two"), follow)

    await in_thread(run)
    fake = server.fake
    assert fake.sockets_opened == 2
    keys = [h["authorization"] for h in fake.handshakes]
    assert keys == ["Bearer sk-key-one", "Bearer sk-key-two"]
    assert "previous_response_id" not in fake.creates()[1].message


async def test_a_chain_by_id_without_a_session_header_finds_its_socket(
    server: ProxyServer,
) -> None:
    """`store: false` ids resolve only on their own socket: the proxy finds it by the id."""

    def run() -> list[str]:
        client = sdk(server)
        ids = [client.responses.create(input="start", **REASONING).id]
        for word in ("two", "three"):
            ids.append(
                client.responses.create(input=word, previous_response_id=ids[-1], **REASONING).id
            )
        return ids

    ids = await in_thread(run)
    creates = server.fake.creates()
    assert server.fake.sockets_opened == 1
    assert [c.message.get("previous_response_id") for c in creates] == [None, *ids[:2]]
    assert server.proxy.placements == {"new": 1, "inferred": 2}


async def test_prompt_cache_key_is_the_session_when_no_header_names_one(
    server: ProxyServer,
) -> None:
    """Interleaved conversations told apart by their `prompt_cache_key` (as Codex and many
    clients set it), and a header session of the same value is another session."""

    def run() -> None:
        client = sdk(server)
        histories: dict[str, list[Any]] = {
            key: [{"role": "user", "content": "same words"}] for key in ("conv-a", "conv-b")
        }
        for turn in range(3):
            for key, history in histories.items():
                _, output = final_output(client, history, prompt_cache_key=key)
                history += [*output, {"role": "user", "content": f"{key} {turn}"}]
        header = sdk(server, **{"session-id": "conv-a"})
        final_output(header, [{"role": "user", "content": "same words"}], prompt_cache_key="x")

    await in_thread(run)
    fake = server.fake
    assert fake.sockets_opened == 3
    by_socket: dict[int, list[Any]] = {}
    for create in fake.creates():
        by_socket.setdefault(create.socket, []).append(create.message.get("prompt_cache_key"))
    assert by_socket == {1: ["conv-a"] * 3, 2: ["conv-b"] * 3, 3: ["x"]}
    assert server.proxy.turns == {"full": 3, "suffix": 4}
    assert server.proxy.placements == {"new": 3, "cache_key": 4}


async def test_health_metrics_and_the_turn_log_say_how_each_turn_found_its_socket(
    server: ProxyServer, caplog: Any
) -> None:
    caplog.set_level("INFO", logger="trioproxy.turn")
    await in_thread(lambda: conversation(sdk(server), 2, final_output))
    async with server.client() as client:
        health = (await client.get(server.base_url.removesuffix("/v1") + "/healthz")).json()
        metrics = (await client.get(server.base_url.removesuffix("/v1") + "/metrics")).text
    assert health["placements"] == {"new": 1, "inferred": 1}
    assert 'trioproxy_turn_placements_total{how="inferred"} 1.0' in metrics
    found = [r.fields["socket_found"] for r in caplog.records if hasattr(r, "fields")]
    assert found == ["new", "inferred"]


async def test_an_idle_socket_leaves_the_index_when_it_goes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Entries leave with their socket: after the idle TTL the conversation is not found and
    the next turn opens a new socket."""
    from tests.conftest import memory_connector

    fake = FakeUpstream()
    server = await start_proxy(nursery, fake, connector=memory_connector(fake), idle_ttl=60)
    registry = server.registry
    async with server.client() as client:
        first = await client.post(
            "/responses", json={"model": "gpt-5", "input": "hi"}, headers=AUTH
        )
        output = first.json()["output"]
        assert len(registry.unnamed) == 3  # its group, its ending, its last response id
        await trio.sleep(61)
        await wait_until(lambda: registry.pooled == 0)
        assert len(registry.unnamed) == 0
        follow = [{"role": "user", "content": "hi"}, *output, {"role": "user", "content": "x"}]
        body = {"model": "gpt-5", "input": follow}
        await client.post("/responses", json=body, headers=AUTH)
    assert fake.sockets_opened == 2
