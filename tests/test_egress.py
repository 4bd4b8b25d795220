"""Reaching the provider through a corporate egress proxy (HTTP CONNECT) and a private CA.

A small CONNECT proxy here records what it was asked to tunnel to and pipes the bytes; the
proxy under test is pointed at it with `HTTP_PROXY`/`HTTPS_PROXY`, as Codex and the SDK are.
Every outbound path goes through it: the upstream WebSocket, the model list, the HTTP fallback.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from tests.conftest import AUTH, post, request_body, start_proxy, user
from trioproxy import endpoint
from trioproxy.fake import FakeUpstream


@dataclass
class ConnectProxy:
    port: int = 0
    tunnels: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    refuse: bool = False

    async def serve(self, *, task_status: trio.TaskStatus[ConnectProxy]) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._client, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self)

    async def _client(self, client: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await client.receive_some(4096)
            if not chunk:
                return
            head += chunk
        lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
        method, target, _ = lines[0].split(" ")
        assert method == "CONNECT"
        self.tunnels.append(target)
        auth = [
            line.split(":", 1)[1].strip()
            for line in lines
            if line.lower().startswith("proxy-authorization:")
        ]
        self.authorizations.append(auth[0] if auth else None)
        if self.refuse:
            await client.send_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            await client.aclose()
            return
        host, port = target.rsplit(":", 1)
        upstream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
            try:
                while data := await a.receive_some(65536):
                    await b.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(b)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, client, upstream)
            nursery.start_soon(pipe, upstream, client)


@pytest.fixture
async def egress(nursery: trio.Nursery) -> ConnectProxy:
    return await nursery.start(ConnectProxy().serve)


async def test_every_outbound_call_goes_through_the_egress_proxy(
    nursery: trio.Nursery, fake: FakeUpstream, egress: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://corp:s3cret@127.0.0.1:{egress.port}")
    server = await start_proxy(nursery, fake)
    async with server.client(trust_env=False) as client:
        turn = await post(client, request_body([user("through the tunnel")]))
        models = await client.get("/models", headers=AUTH)
    assert turn.status_code == models.status_code == 200
    target = f"127.0.0.1:{fake.port}"
    assert egress.tunnels == [target, target]  # the WebSocket, then the model list
    assert egress.authorizations[0] == "Basic Y29ycDpzM2NyZXQ="  # corp:s3cret
    assert turn.json()["output"][0]["content"][0]["text"] == "You said: through the tunnel"


async def test_no_proxy_bypasses_and_a_refused_tunnel_is_a_clear_502(
    nursery: trio.Nursery, fake: FakeUpstream, egress: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{egress.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = await start_proxy(nursery, fake)
    async with server.client(trust_env=False) as client:
        assert (await post(client, request_body([user("direct")]))).status_code == 200
    assert egress.tunnels == []
    monkeypatch.delenv("NO_PROXY")
    egress.refuse = True
    async with server.client(trust_env=False) as client:
        refused = await post(client, request_body([user("x")]), session="other")
    assert refused.status_code == 502
    assert "refused CONNECT" in refused.json()["error"]["message"]


def test_a_private_ca_is_trusted_from_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    import certifi

    monkeypatch.setenv("TRIOPROXY_CA_FILE", certifi.where())
    endpoint.tls_context.cache_clear()
    try:
        context = endpoint.tls_context()
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.cert_store_stats()["x509_ca"] > 0
    finally:
        endpoint.tls_context.cache_clear()


@pytest.mark.parametrize(
    ("no_proxy", "host", "bypassed"),
    [
        ("*", "api.openai.com", True),
        ("openai.com", "api.openai.com", True),
        (".openai.com", "api.openai.com", True),
        ("openai.com", "notopenai.com", False),
        ("[::1]", "::1", True),
        ("::1", "[::1]", True),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.1.2.3", False),
        ("internal:8443", "internal", True),
        ("", "api.openai.com", False),
    ],
)
def test_no_proxy_matches_domains_addresses_networks_and_ports(
    no_proxy: str, host: str, bypassed: bool
) -> None:
    assert endpoint.bypassed(host, no_proxy) is bypassed


def test_an_unusable_proxy_variable_is_refused_at_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trioproxy import cli

    monkeypatch.setenv("ALL_PROXY", "socks5h://127.0.0.1:1080")
    assert cli.main(["serve", "--port", "0"]) == 2
    assert "must be an http:// URL" in capsys.readouterr().err
