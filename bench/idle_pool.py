"""Idle pool cost: open K sessions through the proxy core, keep them idle, report RSS per session.

    .venv/bin/python bench/idle_pool.py --sessions 5000
    .venv/bin/python bench/idle_pool.py --sessions 1000 --codex --lanes   # shared sockets
    .venv/bin/python bench/idle_pool.py --sessions 1000 --codex --lanes --websocket

With `--websocket` each session is a WebSocket client of the whole app (served by hypercorn in
this process, as Codex with `supports_websockets = true` would be): it opens its socket, sends
the turn as a `response.create`, reads to the end and closes; the pooled state is the same.

The fake upstream runs in a child process so its memory is not counted. A first version of
the idle-pool scenario; `make bench` (the bench issue) builds on it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import open_websocket_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` too

from bench.scenario import first_request
from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import Settings
from trioproxy.connector import websocket_connector
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry
from trioproxy.targets import api_target


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS shows what
    idle sockets hold rather than the high-water mark of the turns that filled them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(
    sessions: int,
    batch: int,
    as_json: bool,
    deflate: bool,
    codex: bool,
    hold: float,
    events_context: bool,
    lanes: bool,
    websocket: bool,
) -> None:
    port = free_port()
    fake = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "trioproxy.cli",
            "--log-level",
            "WARNING",
            "fake-upstream",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        settings = Settings(
            upstream=f"ws://127.0.0.1:{port}/v1/responses",
            max_sockets=sessions + 1,
            permessage_deflate=deflate,
            deflate_hold=hold,
            deflate_events_context=events_context,
            lanes=lanes,
        )
        async with trio.open_nursery() as nursery:
            if websocket:
                app = create_app(settings)
                config = hypercorn_config("127.0.0.1", 0, settings.write_timeout, 1 << 24)
                config.backlog = batch * 2
                binds = await nursery.start(partial(hypercorn_serve, app, config))
                url = binds[0].replace("http://", "ws://") + "/v1/responses"
                proxy: Proxy = app.extensions["trioproxy"]
                registry = proxy.registry
            else:
                registry = Registry(settings, websocket_connector(settings))
                proxy = Proxy(settings, registry)
                await nursery.start(registry.run)
            with trio.fail_after(30):
                while True:
                    try:
                        await trio.open_tcp_stream("127.0.0.1", port)
                        break
                    except OSError:
                        await trio.sleep(0.1)

            async def one(i: int) -> None:
                headers = [("authorization", "Bearer sk-bench"), ("session-id", f"s{i}")]
                body = first_request(2, i) if codex else {"model": "m", "input": f"hello {i}"}
                if websocket:
                    await over_websocket(url, headers, body)
                    return
                stream = await proxy.open_turn(body, headers, api_target(settings))
                async for _ in stream:
                    pass
                assert stream.end.kind == "completed", stream.end

            await one(-1)  # warm up imports and caches before the baseline
            gc.collect()
            before = rss_kib()
            started = time.perf_counter()
            for start in range(0, sessions, batch):
                async with trio.open_nursery() as group:
                    for i in range(start, min(start + batch, sessions)):
                        group.start_soon(one, i)
            elapsed = time.perf_counter() - started
            gc.collect()
            busy = rss_kib()  # every socket just used: compression context still held
            await trio.sleep(hold + 0.5)
            gc.collect()
            trim()
            after = rss_kib()
            stats = registry.stats()
            pooled = stats["seats"] if lanes else registry.idle
            assert pooled == sessions + 1 and registry.idle == registry.live, stats
            sweep_started = time.perf_counter()
            registry._sweep(trio.current_time())
            sweep = time.perf_counter() - sweep_started
            print(
                f"sessions pooled idle: {pooled} on {registry.live} upstream sockets "
                f"({registry.opened} handshakes; lanes {'on' if lanes else 'off'}; "
                f"{'WebSocket clients' if websocket else 'proxy core'})"
            )
            print(f"opened in {elapsed:.1f} s ({sessions / elapsed:.0f} sessions/s)")
            print(
                f"RSS {before / 1024:.1f} MiB -> {busy / 1024:.1f} MiB right after the turns "
                f"({(busy - before) / sessions:.1f} KiB per session) -> {after / 1024:.1f} MiB "
                f"{hold + 0.5:g} s later: {(after - before) / sessions:.1f} KiB per idle "
                "pooled session"
            )
            print(f"one registry sweep with {pooled} idle sessions: {sweep * 1e6:.0f} us")
            if as_json:
                figures = {
                    "sessions": sessions,
                    "lanes": lanes,
                    "websocket_clients": websocket,
                    "sockets": registry.live,
                    "handshakes": registry.opened,
                    "kib_per_session": (after - before) / sessions,
                    "kib_per_socket": (after - before) / sessions,
                    "kib_per_socket_just_used": (busy - before) / sessions,
                    "deflate": deflate,
                    "codex_turn": codex,
                    "events_context": events_context,
                    "rss_before_mib": before / 1024,
                    "rss_after_mib": after / 1024,
                    "sweep_us": sweep * 1e6,
                    "open_s": elapsed,
                    "deflate_hold_s": hold,
                }
                print(json.dumps(figures))
            await registry.aclose()
            nursery.cancel_scope.cancel()
    finally:
        fake.terminate()
        await fake.wait()


async def over_websocket(url: str, headers: list[tuple[str, str]], body: dict[str, Any]) -> None:
    """One session as a WebSocket client of ours: its turn, read to its end, then it leaves."""
    extra = [(name.encode(), value.encode()) for name, value in headers]
    async with open_websocket_url(url, extra_headers=extra, max_message_size=1 << 24) as ws:
        await ws.send_message(json.dumps({"type": "response.create", **body}))
        while True:
            event = json.loads(await ws.get_message())
            if event["type"] in ("response.completed", "response.failed", "error"):
                assert event["type"] == "response.completed", event
                return


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    parser.add_argument(
        "--deflate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer permessage-deflate upstream (the proxy's default)",
    )
    parser.add_argument(
        "--codex", action="store_true", help="each session's turn is Codex's 40 KB first request"
    )
    parser.add_argument(
        "--deflate-hold",
        type=float,
        default=2.0,
        help="seconds an idle socket keeps its compressor (the proxy's default is 60); the "
        "idle figure is taken after it",
    )
    parser.add_argument(
        "--events-context",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="let the upstream compress events against earlier ones (off by default)",
    )
    parser.add_argument(
        "--lanes",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="seat sessions on named lanes of shared sockets (the proxy's --lanes)",
    )
    parser.add_argument(
        "--websocket",
        action="store_true",
        help="sessions arrive as WebSocket clients of the app (Codex's supports_websockets)",
    )
    args = parser.parse_args()
    trio.run(
        main,
        args.sessions,
        args.batch,
        args.json,
        args.deflate,
        args.codex,
        args.deflate_hold,
        args.events_context,
        args.lanes,
        args.websocket,
    )
