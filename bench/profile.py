"""Profile trioproxy alone: the fake upstream, `trioproxy serve` and the load generator, one run.

    .venv/bin/python bench/profile.py --sessions 16 --turns 60
    .venv/bin/python bench/profile.py --sessions 32 --turns 40 --py-spy profile.txt
    .venv/bin/python bench/profile.py --sessions 1 --turns 200 --stages
    .venv/bin/python bench/profile.py --sessions 16 --turns 60 --lanes   # shared sockets

Prints turns/s, events/s, the proxy's CPU per 1,000 events, the writes the proxy made per turn
(HTTP body reads on the client side: about one per write), and the CPU each of the three
processes used, which says whether the machine was saturated. With `--py-spy` (not a
dependency: `.venv/bin/pip install py-spy`) it samples the proxy during the run and prints the
functions with the largest inclusive share of its samples. With `--stages` (one session) it
runs the proxy under bench/stages.py and prints the mean time between the stages of a turn's
way to its first event. This is where the figures in bench/README.md's "Profile" section come
from.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import resource
import shutil
import signal
import statistics
import sys
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import load  # noqa: E402
from bench import stages as stages_module  # noqa: E402
from bench.run import (  # noqa: E402
    VENV_BIN,
    Process,
    fake_process,
    free_port,
    proxy_process,
    wait_http,
)

WARM_UP_TURNS = 4  # two sessions of two turns, before the measured run


def top_shares(raw: Path, count: int) -> list[tuple[float, str]]:
    """Inclusive share of samples per function from py-spy's raw (collapsed stack) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for frame in {re.sub(r":\d+\)", ")", f) for f in stack.split(";")}:
            inclusive[frame] += int(n)
    return [(100 * v / total, k) for k, v in inclusive.most_common(count)]


async def main(
    sessions: int,
    turns: int,
    spy_out: Path | None,
    deflate: bool,
    stages: bool,
    lanes: bool = False,
    delay: float = 0.0,
) -> None:
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    fake_port, proxy_port = free_port(), free_port()
    stamps = ROOT / "bench" / "results" / "profile-stages.json"
    stamps.unlink(missing_ok=True)
    fake = fake_process("profile-fake", fake_port, delay)
    proxy = proxy_process(
        "profile-trioproxy",
        proxy_port,
        fake_port,
        *(() if deflate else ("--no-permessage-deflate",)),
        *(("--lanes",) if lanes else ()),
        # The same server, its turns timed stage by stage (bench/stages.py).
        command=[sys.executable, str(ROOT / "bench" / "stages.py")] if stages else None,
        env={"TRIOPROXY_STAGES_OUT": str(stamps)},
    )
    spy = None
    try:
        assert await wait_http(f"http://127.0.0.1:{fake_port}/_fake/stats")
        assert await wait_http(f"http://127.0.0.1:{proxy_port}/healthz")
        target = f"http://127.0.0.1:{proxy_port}/v1"
        await load.run("trioproxy", target, 2, WARM_UP_TURNS // 2)  # warm-up, out of the figures
        if spy_out is not None:
            binary = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
            assert binary, "py-spy is not installed: .venv/bin/pip install py-spy"
            argv = [binary, "record", "-f", "raw", "-r", "250", "-o", str(spy_out)]
            spy = Process("profile-py-spy", [*argv, "-p", str(proxy.proc.pid)])
            await trio.sleep(1.0)
        metrics = f"http://127.0.0.1:{proxy_port}/metrics"
        inside = await _first_event_totals(metrics)
        cpu = (proxy.cpu_seconds(), fake.cpu_seconds(), _own_cpu())
        result = await load.run("trioproxy", target, sessions, turns)
        now = (proxy.cpu_seconds(), fake.cpu_seconds(), _own_cpu())
        after = await _first_event_totals(metrics)
        inside = (after[0] - inside[0], after[1] - inside[1])
        used = [b - a for a, b in zip(cpu, now, strict=True)]
    finally:
        if spy is not None:  # py-spy writes its samples on SIGINT
            spy.proc.send_signal(signal.SIGINT)
            spy.proc.wait(30)
            spy.log.close()
        proxy.stop()
        fake.stop()
    wall, events = result.wall, result.events
    print(
        f"{sessions} sessions x {turns} turns: {result.turns / wall:.1f} turns/s, "
        f"{events / wall:,.0f} events/s, errors {result.errors}\n"
        f"proxy CPU per 1,000 events {used[0] / (events / 1000):.3f} s; "
        f"writes per turn {result.chunks / result.turns:.1f} for "
        f"{events / result.turns:.1f} events\n"
        f"CPU over {wall:.1f} s of wall time: proxy {used[0]:.1f} s, fake {used[1]:.1f} s, "
        f"load generator {used[2]:.1f} s (2 cores: {2 * wall:.1f} s)\n"
        f"time to first event, mean: {1000 * statistics.fmean(result.ttfe):.2f} ms at the "
        f"client, {1000 * inside[0] / max(inside[1], 1):.2f} ms of it from the proxy sending "
        "the turn upstream to the first event coming back"
    )
    if stages:
        turns = json.loads(stamps.read_text())[WARM_UP_TURNS:]
        _print_stages(stages_module.whole(turns), result.ttfe)


async def _first_event_totals(url: str) -> tuple[float, float]:
    """Sum and count of the proxy's `trioproxy_first_event_seconds` histogram."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(url)).text
    for family in text_string_to_metric_families(text):
        if family.name == "trioproxy_first_event_seconds":
            found = {s.name: s.value for s in family.samples}
            return found[f"{family.name}_sum"], found[f"{family.name}_count"]
    return 0.0, 0.0


def _print_stages(turns: list[dict[str, float]], ttfe: list[float]) -> None:
    """Mean time between consecutive stamps, and what lies outside the proxy's handler."""
    print(f"\nwhere the time to first event goes (means over {len(turns)} turns, ms):")
    inside = 0.0
    for (before, _), (stage, what) in itertools.pairwise(stages_module.STAGES):
        mean = 1000 * statistics.fmean(t[stage] - t[before] for t in turns)
        inside += mean
        print(f"{mean:7.3f}  {what}")
    client = 1000 * statistics.fmean(ttfe)
    print(
        f"{client - inside:7.3f}  outside the handler: the client sending, hypercorn reading "
        f"the head, the client reading the chunk\n{client:7.3f}  at the client"
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--py-spy", type=Path, help="write py-spy's raw samples here")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--no-deflate", action="store_true", help="run the proxy without permessage-deflate"
    )
    parser.add_argument(
        "--lanes", action="store_true", help="run the proxy with sessions on shared sockets"
    )
    parser.add_argument(
        "--event-delay",
        type=float,
        default=0.0,
        help="seconds the fake waits between a response's events (0: bursts, as fast as it can)",
    )
    parser.add_argument(
        "--stages",
        action="store_true",
        help="time each stage of a turn's way to its first event (one session only)",
    )
    args = parser.parse_args()
    if args.stages and args.sessions != 1:
        parser.error("--stages times turns one at a time: use --sessions 1")
    trio.run(
        main,
        args.sessions,
        args.turns,
        args.py_spy,
        not args.no_deflate,
        args.stages,
        args.lanes,
        args.event_delay,
    )
    if args.py_spy is not None and args.py_spy.exists():
        print(f"\nlargest inclusive shares of the proxy's samples ({args.py_spy}):")
        for share, name in top_shares(args.py_spy, args.top):
            print(f"{share:5.1f} % {name}")
