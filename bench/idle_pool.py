"""Idle pool cost: open K sessions through the proxy core, keep them idle, report RSS per socket.

    .venv/bin/python bench/idle_pool.py --sessions 5000

The fake upstream runs in a child process so its memory is not counted. A first version of
the idle-pool scenario; `make bench` (the bench issue) builds on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from trioproxy.config import Settings
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry
from trioproxy.targets import api_target
from trioproxy.upstream import websocket_connector


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(sessions: int, batch: int, as_json: bool) -> None:
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
            upstream=f"ws://127.0.0.1:{port}/v1/responses", max_sockets=sessions + 1
        )
        registry = Registry(settings, websocket_connector(settings))
        proxy = Proxy(settings, registry)
        async with trio.open_nursery() as nursery:
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
                stream = await proxy.open_turn(
                    {"model": "m", "input": f"hello {i}"}, headers, api_target(settings)
                )
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
            after = rss_kib()
            assert registry.idle == sessions + 1, registry.stats()
            sweep_started = time.perf_counter()
            registry._sweep(trio.current_time())
            sweep = time.perf_counter() - sweep_started
            print(f"sessions pooled idle: {registry.idle}")
            print(f"opened in {elapsed:.1f} s ({sessions / elapsed:.0f} sessions/s)")
            print(
                f"RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB: "
                f"{(after - before) / sessions:.1f} KiB per idle pooled socket"
            )
            print(f"one registry sweep with {registry.idle} idle sockets: {sweep * 1e6:.0f} us")
            if as_json:
                figures = {
                    "sessions": sessions,
                    "kib_per_socket": (after - before) / sessions,
                    "rss_before_mib": before / 1024,
                    "rss_after_mib": after / 1024,
                    "sweep_us": sweep * 1e6,
                    "open_s": elapsed,
                }
                print(json.dumps(figures))
            await registry.aclose()
            nursery.cancel_scope.cancel()
    finally:
        fake.terminate()
        await fake.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    args = parser.parse_args()
    trio.run(main, args.sessions, args.batch, args.json)
