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


async def start_serve(
    nursery: trio.Nursery, fake: FakeUpstream, grace: float
) -> tuple[trio.Process, str]:
    port = free_port()
    env = {**os.environ, "TRIOPROXY_SHUTDOWN_GRACE": str(grace)}
    run = partial(
        trio.run_process,
        commands(port, fake.url)["cli"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    process = await nursery.start(run)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(f"{base}/healthz")
    return process, base


async def stream_turn(
    client: httpx.AsyncClient,
    prompt: str,
    events: list[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A streaming turn whose event types land in `events`; started once the first arrived."""
    request = client.stream(
        "POST",
        "/responses",
        json=request_body([user(prompt)], stream=True),
        headers={**AUTH, "session-id": "draining"},
    )
    async with request as reply:
        async for line in reply.aiter_lines():
            if line.startswith("event: "):
                events.append(line[len("event: ") :])
                if len(events) == 1:
                    task_status.started()


async def wait_for_503(client: httpx.AsyncClient) -> httpx.Response:
    """The signal lands asynchronously: ask until the proxy starts refusing."""
    with trio.fail_after(5):
        while True:
            reply = await client.post(
                "/responses", json=request_body("new"), headers={**AUTH, "session-id": "new"}
            )
            if reply.status_code == 503:
                return reply
            assert reply.status_code == 200, reply.text
            await trio.sleep(0.02)


@pytest.mark.parametrize("grace", [10.0, 0.3], ids=["turn-finishes", "grace-runs-out"])
async def test_sigterm_refuses_new_turns_and_lets_running_ones_finish_within_the_grace(
    fake: FakeUpstream, nursery: trio.Nursery, grace: float
) -> None:
    process, base = await start_serve(nursery, fake, grace)
    events: list[str] = []
    try:
        async with (
            httpx.AsyncClient(base_url=f"{base}/v1", timeout=30) as client,
            trio.open_nursery() as turns,
        ):
            # ~14 events 0.2 s apart: a turn of about 3 s, running when the signal comes.
            await turns.start(stream_turn, client, "Take your time.\nfake: slow 0.2", events)
            process.send_signal(signal.SIGTERM)
            refused = await wait_for_503(client)
            health = await client.get(f"{base}/healthz")
        assert refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["connection"] == "close"  # no keep-alive into a closing server
        assert health.status_code == 503
        with trio.fail_after(20):
            await process.wait()
            await fake.wait_open_sockets(0)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0
    if grace > 5:
        assert events[-1] == "response.completed"  # the running turn finished in full
    else:
        assert events[-2:] == ["error", "response.failed"]  # cut at the grace, and said so


SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
BURST = 300  # more than hypercorn's default backlog of 100, as many as the bench's 256 sessions


@pytest.mark.skipif(
    not SOMAXCONN.exists() or int(SOMAXCONN.read_text()) <= BURST,
    reason="the kernel caps every listen backlog below the burst (net.core.somaxconn)",
)
async def test_a_burst_of_clients_waits_in_the_listen_queue(
    fake: FakeUpstream, nursery: trio.Nursery
) -> None:
    """Clients connecting faster than the server accepts wait in the kernel's queue: with
    hypercorn's default backlog (100) the bench's 256 sessions had connections reset. The
    server is stopped (SIGSTOP), so nothing is accepted while the burst connects."""
    process, base = await start_serve(nursery, fake, grace=5.0)
    port = int(base.rsplit(":", 1)[1])
    socks = [trio.socket.socket() for _ in range(BURST)]
    connected = 0

    async def connect(sock: trio.socket.SocketType) -> None:
        nonlocal connected
        await sock.connect(("127.0.0.1", port))
        connected += 1

    process.send_signal(signal.SIGSTOP)
    try:
        # Over a full queue a SYN is dropped and its connect waits for a retry a second later.
        with trio.move_on_after(2):
            async with trio.open_nursery() as burst:
                for sock in socks:
                    burst.start_soon(connect, sock)
    finally:
        process.send_signal(signal.SIGCONT)
    assert connected == BURST

    answers: list[bytes] = []

    async def health(sock: trio.socket.SocketType) -> None:
        await sock.send(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:  # the head is enough
            chunk = await sock.recv(4096)
            assert chunk, answer
            answer += chunk
        answers.append(answer)
        sock.close()

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as clients:
                for sock in socks:
                    clients.start_soon(health, sock)
        assert len(answers) == BURST
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), {a[:40] for a in answers}
    finally:
        process.kill()
        for sock in socks:
            sock.close()
