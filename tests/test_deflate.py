"""permessage-deflate on the upstream socket: offered by default, used when accepted, and
measured on the real wire (the fake counts the TCP bytes each message took)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import AUTH, memory_connector, post, sse_events, start_proxy, user
from trioproxy.fake import FakeUpstream
from trioproxy.wsclient import RECEIVE_BYTES, WsUrl

# trio-websocket's default read size, which a large event used to need many reads of.
RECEIVE_BYTES_BEFORE = 4 * 1024
CAPTURED = Path(__file__).parent / "data" / "codex-0.169.0-first-turn.json"


def codex_body(history: list[Any]) -> dict[str, Any]:
    """Codex's real request shape (its tools and instructions) around this conversation."""
    body = dict(json.loads(CAPTURED.read_text())["body"])
    body.update(input=history, stream=True)
    return body


async def tool_loop(server: Any, turns: int) -> list[list[tuple[str, dict[str, Any]]]]:
    """A Codex-shaped loop: every turn echoes the output and adds a tool result."""
    history: list[Any] = [user("fake: call shell {}")]
    streams = []
    async with server.client() as client:
        for n in range(turns):
            reply = await post(client, codex_body(history), "deflate-session")
            assert reply.status_code == 200, reply.text
            events = sse_events(reply.text)
            streams.append(events)
            done = events[-1][1]["response"]
            history.extend(done["output"])
            call = next(i for i in done["output"] if i["type"] == "function_call")
            history.append(
                {"type": "function_call_output", "call_id": call["call_id"], "output": f"ok {n}"}
            )
            history.append(user("fake: call shell {}"))
    return streams


async def test_deflate_is_negotiated_and_continuations_cost_little(nursery: trio.Nursery) -> None:
    fake = FakeUpstream(record_frames=True)
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake)
    streams = await tool_loop(server, 4)
    assert "permessage-deflate" in fake.handshakes[0]["sec-websocket-extensions"]
    creates = fake.creates()
    assert fake.sockets_opened == 1 and [r.socket for r in creates] == [1, 1, 1, 1]
    print("\nsize -> wire per turn:", [(r.size, r.wire) for r in creates])
    first, *later = creates
    # Turn 1 compresses on its own; each continuation repeats tools and instructions that
    # are still in the window, so it crosses the wire as a small fraction of its size.
    assert first.wire < first.size * 0.5, (first.wire, first.size)
    for turn in later:
        assert turn.size > 5000 and turn.wire < turn.size * 0.1, (turn.wire, turn.size)
    # The events come back compressed too and reach the client byte for byte.
    assert fake.transcripts is not None
    for events in streams:
        rid = events[0][1]["response"]["id"]
        assert [json.dumps(data, separators=(",", ":")) for _, data in events] == [
            json.dumps(json.loads(frame), separators=(",", ":")) for frame in fake.transcripts[rid]
        ]
    # The proxy's own count of the wire agrees with what the fake received.
    async with server.client() as client:
        metrics = (await client.get(server.base_url.removesuffix("/v1") + "/metrics")).text
    wire = _metric(metrics, "trioproxy_upstream_wire_bytes_total")
    sent = _metric(metrics, "trioproxy_upstream_bytes_total")
    assert sent == sum(r.size for r in creates)
    framing = 8 * len(creates)  # a masked frame header is 6-14 bytes
    assert abs(wire - sum(r.wire for r in creates)) <= framing, (wire, [r.wire for r in creates])


async def test_an_upstream_that_declines_gets_plain_frames(nursery: trio.Nursery) -> None:
    fake = FakeUpstream()
    fake.deflate = False
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake)
    streams = await tool_loop(server, 2)
    assert [events[-1][0] for events in streams] == ["response.completed"] * 2
    creates = fake.creates()
    assert "permessage-deflate" in fake.handshakes[0]["sec-websocket-extensions"]  # offered
    assert all(r.size < r.wire <= r.size + 14 for r in creates)  # sent as it is, plus framing


async def test_deflate_can_be_turned_off(nursery: trio.Nursery) -> None:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake, permessage_deflate=False)
    await tool_loop(server, 2)
    assert "sec-websocket-extensions" not in fake.handshakes[0]
    assert all(r.size < r.wire <= r.size + 14 for r in fake.creates())


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_events_context_is_given_up_unless_asked_for(nursery: trio.Nursery) -> None:
    """By default the offer asks the upstream to compress each event on its own, so the proxy
    keeps no decompressor between messages; `deflate_events_context` lets it keep one."""
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    lean = await start_proxy(nursery, fake)
    kept = await start_proxy(nursery, fake, deflate_events_context=True)
    for server in (lean, kept):
        streams = await tool_loop(server, 3)
        assert [events[-1][0] for events in streams] == ["response.completed"] * 3
    offers = [h["sec-websocket-extensions"] for h in fake.handshakes]
    assert "server_no_context_takeover" in offers[0]
    assert "server_no_context_takeover" not in offers[1]
    later = [r for r in fake.creates() if r.message.get("previous_response_id")]
    assert len(later) == 4 and all(r.wire < r.size * 0.1 for r in later), later


def test_websocket_urls_parse_as_the_upgrade_needs_them() -> None:
    url = WsUrl.parse("wss://chatgpt.com/backend-api/codex/responses?x=1")
    assert url == WsUrl("chatgpt.com", 443, "/backend-api/codex/responses?x=1", True)
    assert url.host_header == "chatgpt.com"
    local = WsUrl.parse("ws://[::1]:8765")
    assert (local.resource, local.host_header, local.tls) == ("/", "[::1]:8765", False)
    with pytest.raises(ValueError):
        WsUrl.parse("https://api.openai.com/v1/responses")


def test_deflate_is_a_setting_flag_and_variable() -> None:
    from trioproxy.cli import build_parser
    from trioproxy.config import Settings

    args = build_parser().parse_args(["serve", "--no-permessage-deflate"])
    assert args.permessage_deflate is False
    assert build_parser().parse_args(["serve"]).permessage_deflate is None  # env decides
    env = {"TRIOPROXY_PERMESSAGE_DEFLATE": "false", "TRIOPROXY_DEFLATE_HOLD": "5"}
    settings = Settings.from_env(env)
    assert settings.permessage_deflate is False and settings.deflate_hold == 5.0
    assert Settings().permessage_deflate and not Settings().deflate_events_context
    with pytest.raises(ValueError):
        Settings(deflate_hold=-1)


async def test_a_large_event_is_read_in_one_go(fake: FakeUpstream) -> None:
    """trio-websocket reads 4 KiB at a time unless told otherwise; the response objects a
    Codex turn streams back carry its tools and instructions each (~15-20 KB), and every read
    is a syscall and a pass of wsproto's parser. Reads are up to 16 KiB: a whole response
    waiting in the stream takes a quarter of the reads it took at 4 KiB."""
    fake.deflate = False  # the sizes below are the frames' own
    auth = [(b"authorization", AUTH["authorization"].encode())]
    async with memory_connector(fake, deflate=False)("ws://fake/v1/responses", auth) as sock:
        body = codex_body([user("hello")])
        body.pop("stream")
        body.pop("include", None)  # no reasoning ciphertext: the three sizes stay comparable
        body["instructions"] = "Be brief. " * 800  # three of the events echo them
        await sock.send_text(json.dumps({"type": "response.create", **body}).encode())
        await trio.testing.wait_all_tasks_blocked()  # the whole response waits in the stream
        reads_before, received_before = sock.wire.reads, sock.wire.received
        sizes = []
        while True:
            frame = await sock.receive()
            sizes.append(len(frame))
            if json.loads(frame)["type"] == "response.completed":
                break
        reads = sock.wire.reads - reads_before
        received = sock.wire.received - received_before
    large = [size for size in sizes if 3 * RECEIVE_BYTES_BEFORE < size < 16_000]
    assert len(large) == 3, sizes  # created, in_progress, completed
    assert received > 10 * RECEIVE_BYTES_BEFORE, received
    sixteen = 4 * RECEIVE_BYTES_BEFORE
    assert sixteen == RECEIVE_BYTES
    assert reads <= received // sixteen + 1, (reads, received)  # 4 KiB reads: 12 and more


async def test_a_first_message_read_before_the_fake_resumes_is_still_counted(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load the fake's reader can take a socket's first message before the task that
    accepted it runs again; those bytes belong to that message (the full bench at 256
    sessions showed direct's wire bytes below its JSON bytes)."""
    from trioproxy.fake import server as fake_server

    accept = fake_server._accept

    async def slow_accept(request: Any, deflate: bool, headers: Any) -> Any:
        conn = await accept(request, deflate, headers)
        await trio.testing.wait_all_tasks_blocked()  # the proxy sent turn 1; the reader took it
        return conn

    monkeypatch.setattr(fake_server, "_accept", slow_accept)
    fake = FakeUpstream()
    fake.deflate = False
    await nursery.start(fake.serve)
    server = await start_proxy(nursery, fake)
    await tool_loop(server, 2)
    assert all(r.size < r.wire <= r.size + 14 for r in fake.creates()), fake.creates()
