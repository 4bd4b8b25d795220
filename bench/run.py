"""`make bench`: every contender against the same fake upstream, in one run, side by side.

Starts the fake upstream, trioproxy and (if their bench venvs are there) LiteLLM and codex-lb
as separate processes, runs the codex-shaped sessions at each concurrency through each
contender, measures the proxies' CPU and RSS from /proc, reads upstream bytes from the fake,
and prints a Markdown table and the targets. Ratios matter more than absolute times on a
shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from trioproxy.fake.backend import Logins

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import load  # noqa: E402

VENV_BIN = Path(sys.executable).parent
# `budget`: seconds one contender gets at one concurrency; a slower one is cut there and its
# rates are what it completed (the table marks it), so the quick profile stays under 5 minutes.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"sweep": [1, 16, 64], "turns": 20, "long": 100, "idle": 1_000, "delay": 0.0,
              "budget": 20.0},
    "full": {"sweep": [1, 16, 64, 256], "turns": 20, "long": 100, "idle": 10_000, "delay": 0.0,
             "budget": 120.0},
    # Paced like a model (2 ms between events): latency under load rather than throughput.
    "latency": {"sweep": [1, 64], "turns": 20, "long": 100, "idle": 1_000, "delay": 0.002,
                "budget": 30.0},
}  # fmt: skip
CONTENDERS = ["direct", "trioproxy", "full_http", "litellm", "codex_lb"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A contender's server process, with what /proc says about it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = open(ROOT / "bench" / "results" / f"{name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def fake_process(name: str, port: int, delay: float = 0.0) -> Process:
    """The fake upstream in a process of its own, `delay` seconds between events."""
    argv = [str(VENV_BIN / "trioproxy"), "fake-upstream", "--port", str(port)]
    return Process(name, [*argv, "--event-delay", str(delay)])


def proxy_process(
    name: str,
    port: int,
    fake_port: int,
    *options: str,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Process:
    """`trioproxy serve` (or `command` standing in for it) against the fake at `fake_port`,
    pooling every session the bench opens."""
    argv = [*(command or [str(VENV_BIN / "trioproxy")]), "--log-level", "WARNING", "serve"]
    argv += ["--port", str(port), "--upstream", f"ws://127.0.0.1:{fake_port}/v1/responses"]
    return Process(name, [*argv, "--max-sockets", "100000", *options], env=env)


async def wait_http(url: str, seconds: float = 120) -> bool:
    async with httpx.AsyncClient(timeout=5) as client:
        with trio.move_on_after(seconds):
            while True:
                try:
                    if (await client.get(url)).status_code < 500:
                        return True
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)
    return False


async def quiet_upstream(fake: str, seconds: float = 60.0) -> dict[str, Any]:
    """The fake's stats once it has sent no event for a second (at most `seconds`)."""
    stats = await fake_stats(fake)
    with trio.move_on_after(seconds):
        while True:
            await trio.sleep(1.0)
            now = await fake_stats(fake)
            if now["events_sent"] == stats["events_sent"]:
                break
            stats = now
    return stats


async def proxy_health(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        return dict((await client.get(base.removesuffix("/v1") + "/healthz")).json())


async def fake_stats(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        return dict((await client.get(f"{base}/_fake/stats")).json())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def litellm_config(fake_http: str) -> Path:
    path = ROOT / "bench" / "results" / "litellm.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: gpt-bench\n"
        "    litellm_params:\n"
        "      model: openai/gpt-bench\n"
        f"      api_base: {fake_http}/v1\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
        "  telemetry: false\n"
    )
    return path


CODEX_LB_VENV = ROOT / os.environ.get("CODEX_LB_VENV", ".bench-codex-lb")


def start_codex_lb(fake: str, port: int) -> tuple[Process | None, str]:
    """codex-lb as its README runs it, pointed at the fake's Codex backend by its own setting
    (`CODEX_LB_UPSTREAM_BASE_URL`), with a fresh data directory; no code of it is patched."""
    binary = CODEX_LB_VENV / "bin" / "codex-lb"
    if not binary.exists():
        return None, (
            f"no codex-lb at {binary}: it needs Python 3.13 and `make bench` found none "
            "(python3.13 on PATH or under ~/.pyenv/versions)"
        )
    data = ROOT / "bench" / "results" / "codex-lb-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    env = {
        "CODEX_LB_DATA_DIR": str(data),
        "CODEX_LB_UPSTREAM_BASE_URL": f"{fake}/backend-api",
        # Background calls the fake does not serve (usage polling, credits) and telemetry off;
        # the request path is codex-lb's default.
        "CODEX_LB_USAGE_REFRESH_ENABLED": "false",
        "CODEX_LB_RATE_LIMIT_RESET_CREDITS_REFRESH_ENABLED": "false",
        "CODEX_LB_TELEMETRY_ENABLED": "false",
    }
    argv = [str(binary), "--host", "127.0.0.1", "--port", str(port)]
    return Process("codex_lb", argv, env=env, cwd=data), ""


async def setup_codex_lb(port: int) -> bool:
    """Wait for codex-lb, then give it one ChatGPT account: an `auth.json` login of the kind
    the fake's Codex backend accepts, imported through codex-lb's dashboard API."""
    base = f"http://127.0.0.1:{port}"
    if not await wait_http(f"{base}/health", 180):
        return False
    auth = orjson.dumps(Logins().auth_json("acct-bench", lifetime=7 * 86400))
    async with httpx.AsyncClient(timeout=30) as client:
        reply = await client.post(
            f"{base}/api/accounts/import", files={"auth_json": ("auth.json", auth)}
        )
    if reply.status_code != 200:
        print(f"codex-lb refused the account: {reply.status_code} {reply.text[:200]}")
        return False
    return True


async def measure(
    name: str,
    target: str,
    sessions: int,
    turns: int,
    fake: str,
    server: Process | None,
    budget: float,
) -> dict[str, Any]:
    before, cpu0 = await fake_stats(fake), server.cpu_seconds() if server else 0.0
    health0 = await proxy_health(target) if name == "trioproxy" else {}
    result = await load.run(name, target, sessions, turns, budget=budget)
    cpu1 = server.cpu_seconds() if server else 0.0
    # A cut contender keeps working on the turns it had accepted (a gateway does not stop an
    # upstream turn because its client left): wait until the upstream is quiet, so its bytes
    # land in its own row and not in the next contender's.
    after = await quiet_upstream(fake) if result.cut else await fake_stats(fake)
    http = after["http_bytes"] - before["http_bytes"]
    upstream = after["ws_bytes"] - before["ws_bytes"] + http
    wire = after["ws_wire_bytes"] - before["ws_wire_bytes"] + http
    # Bytes per turn over the turns the upstream saw: a cut run sent some it did not finish.
    sent = after["ws_turns"] - before["ws_turns"] + after["http_turns"] - before["http_turns"]
    row = {
        "contender": name,
        "sessions": sessions,
        "turns": result.turns,
        "errors": result.errors,
        "first_error": result.first_error,
        "wall_s": result.wall,
        "cut": result.cut,
        "turns_per_s": result.turns / result.wall if result.wall else 0.0,
        "events_per_s": result.events / result.wall if result.wall else 0.0,
        "ttfe_p50_ms": percentile(result.ttfe, 0.50) * 1000,
        "ttfe_p99_ms": percentile(result.ttfe, 0.99) * 1000,
        "upstream_bytes_per_turn": upstream / sent if sent else 0.0,
        # A cut run's sessions did not finish: no per-session figure for it.
        "upstream_bytes_per_session": None if result.cut else upstream / sessions,
        "wire_bytes_per_turn": wire / sent if sent else 0.0,
        "cpu_s_per_1k_events": (cpu1 - cpu0) / (result.events / 1000) if server else None,
        "peak_rss_mib": server.peak_rss_mib() if server else None,
        "events": result.events,
    }
    if name == "trioproxy":  # how the proxy sent them: suffix or full, and any retries
        health1 = await proxy_health(target)
        for key in ("turns", "retries"):
            counts = {k: v - health0.get(key, {}).get(k, 0) for k, v in health1[key].items()}
            row[f"proxy_{key}"] = {k: v for k, v in counts.items() if v}
    if sessions == 1 and sent:  # one session's turns, in order: the plot's bytes per turn
        kind = "ws" if after["ws_turns"] > before["ws_turns"] else "http"
        row["turn_bytes"] = after["recent_sizes"][kind][-sent:]
    status = "ok" if not result.errors else f"{result.errors} errors: {result.first_error}"
    if name == "trioproxy":
        status += f" {row['proxy_turns']} retries {row['proxy_retries']}"
    if result.cut:
        status += f" (cut at {budget:.0f} s)"
    print(f"  {name:10s} x{sessions:<4d} {row['turns_per_s']:8.1f} turns/s  {status}", flush=True)
    return row


def floor_bytes(frames: list[bytes]) -> list[int]:
    """The protocol's floor for each continuation: its unchanged request parameters plus its
    new items (previous_response_id carries the conversation but not tools or instructions)."""
    floors = []
    for frame in frames[1:]:
        message = orjson.loads(frame)
        new_items = message.pop("input")
        message.pop("previous_response_id", None)
        message.pop("type", None)
        floors.append(len(orjson.dumps(message)) + len(orjson.dumps(new_items)))
    return floors


async def long_session(turns: int, fake: str, fake_ws: str, proxy: str) -> dict[str, Any]:
    """One session of `turns` turns through trioproxy, direct and full-context HTTP: bytes."""
    out: dict[str, Any] = {"turns": turns}
    direct = await load.run("direct", fake_ws, 1, turns, keep_frames=True)
    assert direct.frames is not None
    out["direct_bytes"] = [len(f) for f in direct.frames]
    out["floor_bytes"] = floor_bytes(direct.frames)
    for name, target in (("trioproxy", proxy), ("full_http", f"{fake}/v1")):
        await load.run(name, target, 1, turns)
        recent = (await fake_stats(fake))["recent_sizes"]
        out[f"{name}_bytes"] = recent["ws" if name == "trioproxy" else "http"][-turns:]
        if name == "trioproxy":  # measured by the fake on its TCP stream: after deflate
            out["trioproxy_wire_bytes"] = recent["ws_wire"][-turns:]
    return out


# The idle pool as a Codex user leaves it (a 40 KB first turn per session), under the proxy's
# defaults (deflate on, compressor freed once idle), with the events' context kept too, and
# without deflate.
IDLE_VARIANTS = {
    "defaults": [],
    "deflate with events_context": ["--events-context"],
    "deflate off": ["--no-deflate"],
}


def idle_pool(sessions: int, *variant: str) -> dict[str, Any]:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "idle_pool.py"),
            "--sessions",
            str(sessions),
            "--codex",
            "--json",
            *variant,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


async def main(profile: str, contenders: list[str]) -> dict[str, Any]:
    settings = PROFILES[profile]
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    fake_port, proxy_port, litellm_port = free_port(), free_port(), free_port()
    codex_lb_port = free_port()
    fake = f"http://127.0.0.1:{fake_port}"
    fake_ws = f"ws://127.0.0.1:{fake_port}/v1/responses"
    # The gateways get a fake upstream each (same code, same settings): their background calls
    # and the turns they finish after a cut would otherwise land in other contenders' bytes.
    # An idle fake costs no CPU.
    gateway_fakes = {name: free_port() for name in ("litellm", "codex_lb")}
    delay = settings["delay"]
    servers = [fake_process("fake", fake_port, delay)]
    servers += [fake_process(f"fake-{name}", port, delay) for name, port in gateway_fakes.items()]
    fakes = {name: f"http://127.0.0.1:{port}" for name, port in gateway_fakes.items()}
    proxy = proxy_process("trioproxy", proxy_port, fake_port)
    servers.append(proxy)
    litellm_bin = Path(os.environ.get("BENCH_VENV", ROOT / ".bench-venv")) / "bin" / "litellm"
    litellm: Process | None = None
    skipped: dict[str, str] = {}
    codex_lb: Process | None = None
    if "codex_lb" in contenders:
        codex_lb, why = start_codex_lb(fakes["codex_lb"], codex_lb_port)
        if codex_lb is None:
            skipped["codex_lb"] = why
        else:
            servers.append(codex_lb)
    if "litellm" in contenders and litellm_bin.exists():
        litellm = Process(
            "litellm",
            [
                str(litellm_bin),
                "--config",
                str(litellm_config(fakes["litellm"])),
                "--port",
                str(litellm_port),
                "--num_workers",
                "1",
            ],
            env={
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "LITELLM_MASTER_KEY": "sk-bench",  # what the load generator sends
                "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",  # a local bench
            },
        )
        servers.append(litellm)
    elif "litellm" in contenders:
        skipped["litellm"] = f"no LiteLLM at {litellm_bin} (make bench installs it)"
    try:
        for base in (fake, *fakes.values()):
            assert await wait_http(f"{base}/_fake/stats"), "a fake upstream did not start"
        assert await wait_http(f"http://127.0.0.1:{proxy_port}/healthz"), "trioproxy did not start"
        if litellm is not None and not await wait_http(
            f"http://127.0.0.1:{litellm_port}/health/liveliness", 180
        ):
            skipped["litellm"] = "LiteLLM did not start (see bench/results/litellm.log)"
            litellm = None
        if codex_lb is not None and not await setup_codex_lb(codex_lb_port):
            skipped["codex_lb"] = "codex-lb did not start (see bench/results/codex_lb.log)"
            codex_lb = None
        targets = {
            "direct": (fake_ws, None),
            "trioproxy": (f"http://127.0.0.1:{proxy_port}/v1", proxy),
            "full_http": (f"{fake}/v1", None),
            "litellm": (f"http://127.0.0.1:{litellm_port}/v1", litellm),
            "codex_lb": (f"http://127.0.0.1:{codex_lb_port}/v1", codex_lb),
        }
        # Warm-up: imports, caches and the first connections out of the measured runs.
        for name in contenders:
            if name in targets and name not in skipped:
                await load.run(name, targets[name][0], 2, 2)
        rows = []
        for sessions in settings["sweep"]:
            print(f"{sessions} concurrent sessions x {settings['turns']} turns", flush=True)
            for name in contenders:
                if name in skipped or name not in targets:
                    continue
                target, server = targets[name]
                upstream = fakes.get(name, fake)
                rows.append(
                    await measure(
                        name,
                        target,
                        sessions,
                        settings["turns"],
                        upstream,
                        server,
                        settings["budget"],
                    )
                )
        print(f"one session x {settings['long']} turns (bytes)", flush=True)
        long = await long_session(settings["long"], fake, fake_ws, targets["trioproxy"][0])
    finally:
        for server in reversed(servers):
            server.stop()
    print(f"idle pool: {settings['idle']} sessions", flush=True)
    idle = {}
    for name, variant in IDLE_VARIANTS.items():
        idle[name] = idle_pool(settings["idle"], *variant)
        print(f"  {name}: {idle[name]['kib_per_socket']:.1f} KiB per idle socket", flush=True)
    return {
        "profile": profile,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": settings,
        "rows": rows,
        "long_session": long,
        "idle_pool": idle,
        "skipped": skipped,
    }


# -- the report ------------------------------------------------------------------------------------
def report(data: dict[str, Any]) -> tuple[str, list[tuple[str, bool | None, str]]]:
    rows = data["rows"]
    direct = {r["sessions"]: r for r in rows if r["contender"] == "direct"}
    lines = [
        "| contender | sessions | turns/s | events/s | TTFE p50 ms | TTFE p99 ms | added p50 ms"
        " | added p99 ms | upstream B/turn | wire B/turn | upstream KB/session | CPU s/1k events"
        " | peak RSS MiB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = direct.get(r["sessions"])
        added50 = r["ttfe_p50_ms"] - base["ttfe_p50_ms"] if base else float("nan")
        added99 = r["ttfe_p99_ms"] - base["ttfe_p99_ms"] if base else float("nan")
        cpu = "-" if r["cpu_s_per_1k_events"] is None else f"{r['cpu_s_per_1k_events']:.3f}"
        rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        per_session = r["upstream_bytes_per_session"]
        session = "-" if per_session is None else f"{per_session / 1000:,.1f}"
        name = f"{r['contender']} (cut at {r['wall_s']:.0f} s)" if r.get("cut") else r["contender"]
        lines.append(
            f"| {name} | {r['sessions']} | {r['turns_per_s']:.1f} | "
            f"{r['events_per_s']:.0f} | {r['ttfe_p50_ms']:.2f} | {r['ttfe_p99_ms']:.2f} | "
            f"{added50:+.2f} | {added99:+.2f} | {r['upstream_bytes_per_turn']:,.0f} | "
            f"{r.get('wire_bytes_per_turn', 0):,.0f} | "
            f"{session} | {cpu} | {rss} | {r['errors']} |"
        )
    for name, why in data["skipped"].items():
        lines.append(f"| {name} | - | left out: {why} | | | | | | | | | | | |")
    return "\n".join(lines), targets(data)


def targets(data: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    rows = data["rows"]
    out: list[tuple[str, bool | None, str]] = []

    def row(name: str, sessions: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["contender"] == name and r["sessions"] == sessions), None)

    proxy64, direct64 = row("trioproxy", 64), row("direct", 64)
    if proxy64 and direct64:
        a50 = proxy64["ttfe_p50_ms"] - direct64["ttfe_p50_ms"]
        a99 = proxy64["ttfe_p99_ms"] - direct64["ttfe_p99_ms"]
        out.append(("P1 added TTFE at 64 sessions: p50 <= 1 ms, p99 <= 5 ms", a50 <= 1 and a99 <= 5,
                    f"p50 {a50:+.2f} ms, p99 {a99:+.2f} ms"))  # fmt: skip
    long = data["long_session"]
    proxy_bytes, floors = long["trioproxy_bytes"], long["floor_bytes"]
    continuation_ratio = max(p / f for p, f in zip(proxy_bytes[1:], floors, strict=False))
    full = long["full_http_bytes"]
    n20 = min(20, len(full))
    r20 = sum(proxy_bytes[:n20]) / sum(full[:n20])
    r100 = sum(proxy_bytes) / sum(full)
    wire = long["trioproxy_wire_bytes"]
    deflated = sum(wire[1:]) / sum(proxy_bytes[1:])
    w20, w100 = sum(wire[:n20]) / sum(full[:n20]), sum(wire) / sum(full)
    out.append(("P2 continuation bytes <= 1.01 x floor (params + new items)",
                continuation_ratio <= 1.01,
                f"worst turn {continuation_ratio:.3f} x floor; vs full-context HTTP "
                f"{r20:.2f} over 20 turns, {r100:.2f} over {len(full)}; on the wire with "
                f"permessage-deflate continuations cross at {deflated:.3f} of their size: "
                f"{w20:.3f} / {w100:.3f} of full-context HTTP"))  # fmt: skip
    proxies = [r for r in rows if r["contender"] == "trioproxy"]
    best = max((r["events_per_s"] for r in proxies), default=0.0)
    lite = {r["sessions"]: r for r in rows if r["contender"] == "litellm"}
    ratios = [r["turns_per_s"] / lite[r["sessions"]]["turns_per_s"] for r in proxies
              if r["sessions"] in lite and lite[r["sessions"]]["turns_per_s"]]  # fmt: skip
    vs = f"{min(ratios):.1f}x-{max(ratios):.1f}x LiteLLM's turns/s" if ratios else "no LiteLLM"
    peer = {r["sessions"]: r for r in rows if r["contender"] == "codex_lb"}
    peer_ratios = [r["turns_per_s"] / peer[r["sessions"]]["turns_per_s"] for r in proxies
                   if r["sessions"] in peer and peer[r["sessions"]]["turns_per_s"]]  # fmt: skip
    if peer_ratios:
        vs += f" ({min(peer_ratios):.1f}x-{max(peer_ratios):.1f}x codex-lb's)"
    out.append(("P3 >= 20,000 events/s and >= 3x LiteLLM's turns/s",
                best >= 20_000 and bool(ratios) and min(ratios) >= 3,
                f"best {best:,.0f} events/s; {vs}"))  # fmt: skip
    idle = data["idle_pool"]
    base = idle["defaults"]
    per_socket = base["kib_per_socket"]
    others = "; ".join(f"{name}: {v['kib_per_socket']:.1f} KiB" for name, v in idle.items()
                       if name != "defaults")  # fmt: skip
    just_used = base["kib_per_socket_just_used"]
    hold = base.get("deflate_hold_s", 2.0)
    if base["open_s"] <= hold:
        busy = f"{just_used:.1f} KiB right after their turns, before deflate_hold frees it"
    else:  # the first sockets had freed theirs before the last turn ended
        busy = (f"{just_used:.1f} KiB when the last turn ended: opening took "
                f"{base['open_s']:.0f} s, longer than the bench's {hold:g} s deflate_hold, so most "
                "had freed the compressor by then")  # fmt: skip
    out.append(("P4 <= 100 KB RSS per idle pooled socket", per_socket * 1.024 <= 100,
                f"{per_socket:.1f} KiB per socket over {base['sessions']:,} Codex-shaped "
                f"sessions, defaults ({busy}); {others}; "
                f"sweep {base['sweep_us']:.0f} us"))  # fmt: skip
    return out


def render(data: dict[str, Any]) -> str:
    table, checks = report(data)
    lines = [f"## trioproxy bench ({data['profile']}, {data['when']}, "
             f"{data['machine']['cpus']} CPUs)", "", table, "", "| target | pass | measured |",
             "|---|---|---|"]  # fmt: skip
    for name, ok, detail in checks:
        lines.append(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--report-only", action="store_true", help="re-render latest.json")
    args = parser.parse_args()
    latest = ROOT / "bench" / "results" / "latest.json"
    if args.report_only:
        data = json.loads(latest.read_text())
    else:
        data = trio.run(main, args.profile, args.contenders.split(","))
        latest.write_text(json.dumps(data, indent=2, default=str))
    text = render(data)
    (ROOT / "bench" / "results" / "latest.md").write_text(text + "\n")
    print(text)
