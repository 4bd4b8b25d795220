"""Every early answer leaves the connection usable or closed.

When the proxy refuses a request from its headers alone (bad session id, missing key, a body
over the limit) while the body is still arriving, the next request on that connection must be
answered, or the connection closed: before, it was neither, and a keep-alive client hung until
its own timeout. Real sockets, real hypercorn, the real SDK.
"""

from __future__ import annotations

import json
import re
import socket
import time
from functools import partial

import openai
import trio

from tests.conftest import ProxyServer, nothing_left, start_proxy, wait_until
from trioproxy.fake import FakeUpstream


def port_of(server: ProxyServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1].split("/")[0])


def head(length: str, **headers: str) -> bytes:
    lines = [
        "POST /v1/responses HTTP/1.1",
        "host: proxy",
        "content-type: application/json",
        length,
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def exchange(
    port: int, *parts: bytes, then: bytes = b"", seconds: float = 5.0
) -> tuple[bytes, bool]:
    """Send `parts`, wait for the answer, send `then` on the same connection (as a keep-alive
    client does), then read until the server closes or `seconds` pass: (everything that came
    back, whether the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(seconds)
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:
                break  # the server closed while we were still sending: allowed
        data = b""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                if then and _answered(data):
                    sock.sendall(then)
                    then = b""
                chunk = sock.recv(65536)
                if not chunk:
                    return data, True
                data += chunk
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
    return data, False


def _answered(data: bytes) -> bool:
    """Whether `data` holds one whole response (with a Content-Length)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if sep and line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def statuses(data: bytes) -> list[int]:
    """The status of every response in `data` (a body runs straight into the next head)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


async def test_a_refusal_before_the_body_is_read_keeps_the_connection_usable(
    server: ProxyServer,
) -> None:
    """A 4 MB body with a bad session id: the 400 comes after the body is read, and the next
    request on the same connection is answered."""
    body = json.dumps({"model": "m", "input": "x" * 4_000_000}).encode()
    bad = head(f"content-length: {len(body)}", authorization="Bearer k", session_id="bad\x01id")
    ok = json.dumps({"model": "m", "input": "hi"}).encode()
    follow = head(f"content-length: {len(ok)}", authorization="Bearer k") + ok
    data, _ = await trio.to_thread.run_sync(
        partial(exchange, port_of(server), bad, body, then=follow, seconds=3)
    )
    assert statuses(data) == [400, 200]
    await nothing_left(server)


async def test_the_sdk_gets_the_400_for_a_large_bad_request_and_its_next_call_works(
    server: ProxyServer,
) -> None:
    client = openai.OpenAI(
        base_url=server.base_url,
        api_key="sk-test-key",
        default_headers={"session-id": "s" * 300},  # over the 256 characters allowed
        max_retries=0,
        timeout=10,
    )

    def run() -> tuple[int, str]:
        try:
            client.responses.create(model="m", input="x" * 4_000_000)
        except openai.BadRequestError as exc:
            status = exc.status_code
        good = client.responses.create(model="m", input="hi", extra_headers={"session-id": "fine"})
        return status, good.output_text

    status, text = await trio.to_thread.run_sync(run)
    assert status == 400 and text == "You said: hi"


async def test_a_body_over_the_limit_closes_the_connection(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, max_body_bytes=10_000)
    # The client says 50 kB and sends only part of it: 413 at once, then the server closes.
    partial = head("content-length: 50000", authorization="Bearer k") + b'{"model": "m"'
    data, closed = await trio.to_thread.run_sync(exchange, port_of(server), partial)
    assert statuses(data) == [413] and closed
    assert b"connection: close" in data.lower()


async def test_a_refused_chunked_body_closes_the_connection(server: ProxyServer) -> None:
    """A body of unknown length cannot be drained within a bound: the answer closes."""
    refused = head("transfer-encoding: chunked", session_id="bad\x02id") + b'5\r\n{"mo\r\n'
    data, closed = await trio.to_thread.run_sync(exchange, port_of(server), refused)
    assert statuses(data) == [401] or statuses(data) == [400]
    assert closed


async def test_a_fast_keep_alive_loop_of_refusals_never_wedges(server: ProxyServer) -> None:
    """300 requests on one keep-alive connection, every other one refused from its headers
    (no key) while its body is in flight: each is answered."""
    answered = []
    async with server.client() as client:
        with trio.fail_after(60):
            for n in range(300):
                headers = {"authorization": "Bearer k"} if n % 2 else {}
                reply = await client.post(
                    "/responses", json={"model": "m", "input": f"q{n}"}, headers=headers
                )
                answered.append(reply.status_code)
    assert answered.count(401) == 150 and answered.count(200) == 150
    await nothing_left(server)


async def test_a_body_that_stops_coming_gets_408_and_the_connection_closes(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    server = await start_proxy(nursery, fake, body_timeout=0.5)
    partial_body = head("content-length: 1000", authorization="Bearer k") + b'{"model": "m"'
    data, closed = await trio.to_thread.run_sync(exchange, port_of(server), partial_body)
    assert statuses(data) == [408] and closed


async def test_a_client_that_stops_reading_is_disconnected_after_the_write_timeout(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """Its window stays shut: after `write_timeout` the kernel aborts the connection (hypercorn
    has no write timeout of its own and shields its writes), the turn is cut and its socket
    evicted; before, the connection stayed ESTABLISHED for good."""
    server = await start_proxy(nursery, fake, write_timeout=1.0, event_buffer=4)
    port = port_of(server)

    def stop_reading() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        body = json.dumps({"model": "m", "input": "fake: long 400000", "stream": True}).encode()
        sock.sendall(head(f"content-length: {len(body)}", authorization="Bearer k") + body)
        sock.recv(1024)  # the answer has begun; not another byte is read
        return sock

    sock = await trio.to_thread.run_sync(stop_reading)
    try:
        await wait_until(lambda: server.registry.evictions["abandoned"] == 1, 30)
        await fake.wait_open_sockets(0)

        def reset() -> bool:
            sock.settimeout(5)
            try:
                while sock.recv(1 << 20):
                    pass
            except ConnectionResetError:
                return True
            return True  # an orderly end is a close too

        assert await trio.to_thread.run_sync(reset)
    finally:
        sock.close()
    await nothing_left(server)
