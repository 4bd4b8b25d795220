"""The upstream socket over real TLS, as the live API (`wss://`) is reached.

The socket's task reads while idle and a new job cancels that read (wsclient.py): on trio's
TLS stream a cancelled receive must lose nothing and leave the stream usable, where a cancelled
send would break it. These run the production connector (TCP, TLS with a test CA passed as
`TRIOPROXY_CA_FILE`, the upgrade) against the fake upstream served over TLS.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from tests.conftest import (
    ProxyServer,
    nothing_left,
    post,
    request_body,
    start_proxy,
    user,
    wait_until,
)
from trioproxy import endpoint
from trioproxy.fake import FakeUpstream


@pytest.fixture
async def tls_server(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ProxyServer]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("TRIOPROXY_CA_FILE", str(ca_file))
    endpoint.tls_context.cache_clear()
    fake = FakeUpstream()
    await nursery.start(partial(fake.serve, tls=server_context))
    upstream = f"wss://localhost:{fake.port}/v1/responses"
    yield await start_proxy(nursery, fake, upstream=upstream)
    endpoint.tls_context.cache_clear()


async def test_turns_pings_and_a_close_over_tls(tls_server: ProxyServer) -> None:
    """Turn two is sent after its idle read was cancelled, over the same TLS stream; pings
    while idle are answered over it; the upstream's close is heard while idle."""
    server, fake = tls_server, tls_server.fake
    async with server.client() as client:
        first = await post(client, request_body([user("a")]))
        assert first.status_code == 200, first.text
        with trio.fail_after(5):
            await fake.ping_sockets()
        history = [user("a"), *first.json()["output"], user("b")]
        second = await post(client, request_body(history))
        assert second.status_code == 200, second.text
        long = await post(client, request_body([user("fake: long 400")], stream=True))
        assert long.status_code == 200 and "response.completed" in long.text
    assert fake.sockets_opened <= 2  # the one-off long turn may take a socket of its own
    creates = fake.creates()
    assert creates[1].socket == creates[0].socket
    assert creates[1].message["previous_response_id"] == first.json()["id"]
    await fake.close_sockets()
    await wait_until(lambda: server.registry.pooled == 0)
    await nothing_left(server)
