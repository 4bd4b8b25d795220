"""What the proxy says about itself: /metrics, one JSON log line per turn, and no secret in any."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    AUTH,
    ProxyServer,
    held_proxy,
    post,
    request_body,
    start_proxy,
    user,
    write_auth,
)
from tests.test_managed import KEY_A, UPSTREAM_SECRET, _env_config, ask, start_managed
from trioproxy import managed
from trioproxy.fake import FakeUpstream, Reply
from trioproxy.logs import JsonFormatter


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def session(server: ProxyServer, turns: int = 3, name: str = "s1") -> list[Any]:
    """A client echoing each response's output back, as Codex and SDK users do."""
    history: list[Any] = []
    replies = []
    async with server.client() as client:
        for n in range(turns):
            history.append(user(f"turn {n}"))
            reply = await post(client, request_body(list(history)), name)
            assert reply.status_code == 200, reply.text
            history.extend(reply.json()["output"])
            replies.append(reply)
    return replies


async def test_metrics_count_turns_bytes_tokens_and_latency(server: ProxyServer) -> None:
    await session(server)
    server.fake.queue(Reply.error("rate_limit_exceeded", 429))
    async with server.client() as client:
        await post(client, request_body([user("x")]), "other")
        text = (await client.get(server.base_url.removesuffix("/v1") + "/metrics")).text
    m = scrape(text)
    assert m[("trioproxy_turns_total", (("mode", "full"),))] == 2
    assert m[("trioproxy_turns_total", (("mode", "suffix"),))] == 2
    assert m[("trioproxy_turn_outcomes_total", (("outcome", "completed"),))] == 3
    assert m[("trioproxy_turn_outcomes_total", (("outcome", "error"),))] == 1
    assert m[("trioproxy_turn_transport_total", (("transport", "websocket"),))] == 4
    assert m[("trioproxy_evictions_total", (("reason", "error"),))] == 1
    assert m[("trioproxy_pooled_sockets", ())] == 1 and m[("trioproxy_idle_sockets", ())] == 1
    assert m[("trioproxy_sockets_opened_total", ())] == 2
    assert m[("trioproxy_upstream_bytes_total", ())] == server.proxy.upstream_bytes > 0
    assert m[("trioproxy_request_bytes_total", ())] == server.proxy.request_bytes
    assert m[("trioproxy_suffix_saved_bytes_total", ())] > 0
    assert m[("trioproxy_cached_tokens_total", ())] > 0  # chained turns hit the cache
    assert m[("trioproxy_upstream_handshake_seconds_count", ())] == 2
    assert m[("trioproxy_first_event_seconds_count", ())] == 3  # the refused turn had none
    health = server.registry.stats()
    assert health["pooled"] == m[("trioproxy_pooled_sockets", ())]


def turn_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "trioproxy.turn"]
    return lines


async def test_each_turn_logs_one_json_line_with_its_request_id(
    server: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    replies = await session(server)
    server.fake.queue(Reply.error("rate_limit_exceeded", 429))
    async with server.client() as client:
        failed = await post(client, request_body([user("x")]), "other", **{"x-request-id": "r-9"})
    lines = turn_lines(caplog)
    assert [line["mode"] for line in lines] == ["full", "suffix", "suffix", "full"]
    assert [line["outcome"] for line in lines] == ["completed"] * 3 + ["error"]
    assert lines[3]["code"] == "rate_limit_exceeded" and lines[3]["request_id"] == "r-9"
    assert failed.headers["x-request-id"] == "r-9"
    for reply, line in zip(replies, lines, strict=False):
        assert reply.headers["x-request-id"] == line["request_id"]
        assert line["transport"] == "websocket" and line["sent_bytes"] > 0
        assert line["request_bytes"] > 0 and len(line["session"]) == 12
    assert lines[1]["sent_bytes"] < lines[1]["request_bytes"]  # the suffix saved bytes


async def test_no_secret_appears_in_any_log_line(
    nursery: trio.Nursery, fake: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await start_proxy(nursery, fake)
    await session(server)
    fake.queue(Reply.error("invalid_api_key", 401))
    async with server.client() as client:
        await post(client, request_body([user("x")]), "other")
    # A held ChatGPT login with a local key: its tokens, refreshed, and the key.
    doc = fake.logins.auth_json("acct-log", lifetime=-1)
    auth = write_auth(tmp_path / "auth.json", doc)
    held = await held_proxy(nursery, fake, auth, api_key="local-proxy-key-123")
    async with held.client() as client:
        ok = await client.post(
            "/responses",
            json=request_body("hi"),
            headers={"authorization": "Bearer local-proxy-key-123", "session-id": "h"},
        )
        bad = await client.post(
            "/responses", json=request_body("hi"), headers={"authorization": "Bearer wrong-key"}
        )
    assert ok.status_code == 200 and bad.status_code == 401
    # Managed keys: the proxy key and the channel's upstream key.
    _, keys = managed.load(None, {**_env_config(), "TRIOPROXY_CHANNEL_MAIN_UPSTREAM": fake.url})
    assert keys is not None
    gateway = await start_managed(nursery, fake, keys)
    async with gateway.client() as client:
        assert (await ask(client, KEY_A, request_body("hi"))).status_code == 200
        assert (await ask(client, KEY_A + "-wrong", request_body("hi"))).status_code == 401
    refreshed = json.loads(auth.read_text())["tokens"]
    secrets = {
        AUTH["authorization"].split()[1],
        "local-proxy-key-123",
        "wrong-key",
        KEY_A,
        UPSTREAM_SECRET,
        *(doc["tokens"][k] for k in ("access_token", "refresh_token", "id_token")),
        *(refreshed[k] for k in ("access_token", "refresh_token", "id_token")),
    }
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert len(lines) > 20
    for line in lines:
        for secret in secrets:
            assert secret not in line, line


async def test_metrics_show_lane_seats_forks_and_moves(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, lanes=True)
    await session(server, name="one")
    await session(server, name="two")
    server.fake.queue(Reply.error("invalid_value", 400))
    async with server.client() as client:
        await post(client, request_body([user("refused")]), "two")  # a new seat, refused
        text = (await client.get(server.base_url.removesuffix("/v1") + "/metrics")).text
    m = scrape(text)
    assert m[("trioproxy_lane_seats", ())] == 1  # "one"; "two" lost its seat to the refusal
    assert m[("trioproxy_lane_seats_moved_total", (("reason", "turn_error"),))] == 1
    assert m[("trioproxy_lane_forks_total", ())] == 0
    assert m[("trioproxy_pooled_sockets", ())] == 1
