"""The upstream's response headers reach the client: rate limits, model, turn state.

Codex shows ChatGPT rate limits and credits from the `x-codex-*` headers of its answer, and
notices model changes from `openai-model`; behind the proxy those come from the upgrade answer
of the socket that carries the turn, or from the HTTP fallback's own answer. Only an allow-list
passes: nothing that would change the client's connection, cookies or the proxy's request id.
"""

from __future__ import annotations

import trio

from tests.conftest import ProxyServer, post, request_body, sse_events, start_proxy, user
from trioproxy.fake import FakeUpstream, Reply
from trioproxy.metadata import MAX_VALUE, client_metadata

HOSTILE = [
    ("set-cookie", "session=stolen"),
    ("x-request-id", "req_upstream"),
    ("x-codex-huge", "x" * (MAX_VALUE + 1)),
    ("x-trioproxy-scope", "admin"),
    ("Openai-Model", "gpt-5-served"),
    ("x-ratelimit-remaining-tokens", "123"),
]


def test_only_client_metadata_passes() -> None:
    kept = client_metadata([(n.encode(), v.encode()) for n, v in HOSTILE])
    assert kept == [("openai-model", "gpt-5-served"), ("x-ratelimit-remaining-tokens", "123")]
    many = [(f"x-codex-n{i}", "1") for i in range(200)]
    assert len(client_metadata(many)) == 48


async def test_every_turn_of_a_socket_carries_its_upgrade_headers(server: ProxyServer) -> None:
    server.fake.api_headers = HOSTILE
    async with server.client() as client:
        first = await post(client, request_body([user("a")], stream=True))
        second = await post(client, request_body([user("a"), user("b")]))
    assert server.fake.sockets_opened == 1
    for reply in (first, second):
        assert reply.headers["x-ratelimit-remaining-tokens"] == "123"
        assert reply.headers["openai-model"] == "gpt-5-served"
        assert "set-cookie" not in reply.headers and "x-codex-huge" not in reply.headers
        assert reply.headers["x-request-id"] != "req_upstream"
    assert sse_events(first.text)[-1][0] == "response.completed"


async def test_an_error_answer_keeps_the_rate_limit_headers(server: ProxyServer) -> None:
    """A 429 is exactly when a client wants the rate-limit headers."""
    server.fake.queue(Reply.error("rate_limit_exceeded", 429))
    async with server.client() as client:
        reply = await post(client, request_body([user("a")]))
    assert reply.status_code == 429
    assert reply.headers["x-ratelimit-limit-requests"] == "10000"


async def test_the_http_fallback_relays_its_own_answer_headers(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    fake.websocket_enabled = False
    fake.api_headers = [("x-ratelimit-remaining-requests", "77"), ("set-cookie", "a=b")]
    server = await start_proxy(nursery, fake)
    async with server.client() as client:
        reply = await post(client, request_body([user("a")], stream=True))
    assert fake.http_posts and reply.status_code == 200
    assert reply.headers["x-ratelimit-remaining-requests"] == "77"
    assert "set-cookie" not in reply.headers
