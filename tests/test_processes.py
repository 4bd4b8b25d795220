"""The two ways users run the proxy, as real processes: `trioproxy serve` and hypercorn with the
ASGI app. Each serves a session and, on SIGTERM, closes its upstream socket and exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import AUTH, request_body, user
from trioproxy.fake import FakeUpstream

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def commands(port: int, upstream: str) -> dict[str, list[str]]:
    return {
        "cli": [
            str(VENV_BIN / "trioproxy"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--upstream",
            upstream,
        ],
        "hypercorn": [
            str(VENV_BIN / "hypercorn"),
            "-k",
            "trio",
            "--bind",
            f"127.0.0.1:{port}",
            "trioproxy.asgi:app",
        ],
    }


async def wait_ready(url: str) -> None:
    async with httpx.AsyncClient() as client:
        with trio.fail_after(20):
            while True:
                try:
                    if (await client.get(url)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


@pytest.mark.parametrize("how", ["cli", "hypercorn"])
async def test_process_serves_then_closes_sockets_on_sigterm(
    how: str, fake: FakeUpstream, nursery: trio.Nursery
) -> None:
    port = free_port()
    env = {**os.environ, "TRIOPROXY_UPSTREAM": fake.url}
    run = partial(
        trio.run_process,
        commands(port, fake.url)[how],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    process = await nursery.start(run)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_ready(f"{base}/healthz")
        async with httpx.AsyncClient(base_url=f"{base}/v1", timeout=30) as client:
            for session in ("a", "b"):
                reply = await client.post(
                    "/responses",
                    json=request_body([user("hi")]),
                    headers={**AUTH, "session-id": session},
                )
                assert reply.status_code == 200, reply.text
        assert fake.open_sockets == 2
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await fake.wait_open_sockets(0)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
