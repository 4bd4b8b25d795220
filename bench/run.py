"""`make bench`: every contender against the same fake upstream, in one run, side by side.

Starts the fake upstream, trioproxy, the floor (bench/floor.py: the least a relay can do for
the proxy's job), two trioproxy instances behind nginx and (if their bench venvs are there)
LiteLLM and codex-lb as separate processes, runs the codex-shaped sessions at each concurrency
through each contender (a closed loop), then P1's open loop at half the proxy's measured
capacity, measures the servers' CPU and RSS from /proc, reads upstream bytes from the fake, and
prints a Markdown table, trioproxy's ratios to the floor, and the targets. Ratios matter more
than absolute times on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
# `open_seconds`: about how long P1's open loop runs per contender and concurrency: a session
# gets the turns that fit (at least 5, at most `turns`), so a slow spell does not stretch it.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {"sweep": [1, 16, 64], "turns": 20, "long": 100, "idle": 1_000, "delay": 0.0,
              "budget": 20.0, "open_seconds": 10.0},
    "full": {"sweep": [1, 16, 64, 256], "turns": 20, "long": 100, "idle": 10_000, "delay": 0.0,
             "budget": 120.0, "open_seconds": 30.0},
    # Paced like a model (2 ms between events): latency under load rather than throughput.
    "latency": {"sweep": [1, 64], "turns": 20, "long": 100, "idle": 1_000, "delay": 0.002,
                "budget": 30.0, "open_seconds": 10.0},
}  # fmt: skip
CONTENDERS = [
    "direct",
    "trioproxy",
    "trioproxy_lanes",
    "floor",
    "trioproxy_x2",
    "full_http",
    "litellm",
    "codex_lb",
]
# P1's open loop: these at a fixed rate, half the proxy's closed-loop capacity at 1 and 64
# sessions (or the sweep's largest), measured earlier in the same run.
OPEN_LOOP = ["direct", "floor", "trioproxy"]
BALANCERS = ROOT / ".tools" / "balancers"
NGINX = Path(os.environ.get("BENCH_NGINX", BALANCERS / "usr" / "sbin" / "nginx"))


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


def floor_process(port: int, fake_port: int) -> Process:
    """bench/floor.py against the fake at `fake_port`: the least a relay can do per turn."""
    argv = [sys.executable, str(ROOT / "bench" / "floor.py"), "--port", str(port)]
    return Process("floor", [*argv, "--upstream", f"ws://127.0.0.1:{fake_port}/v1/responses"])


class Group:
    """Several servers measured as one contender: their CPU and peak RSS summed."""

    def __init__(self, members: list[Process]) -> None:
        self.members = members

    def cpu_seconds(self) -> float:
        return sum(m.cpu_seconds() for m in self.members)

    def peak_rss_mib(self) -> float:
        return sum(m.peak_rss_mib() for m in self.members)


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live children (nginx's master and workers), from /proc; the
    master's cutime/cstime keep what exited workers used."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if stat.parent.name == str(pid):
            total += sum(int(f) for f in fields[11:15]) / tick
        elif fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def nginx_config(run_dir: Path, port: int, instances: list[int]) -> str:
    """A minimal nginx in front of the instances, run unprivileged from `run_dir`: one worker,
    sessions hashed by their `session-id` header (consistent hashing, as deploy/ does),
    keep-alive connections to the instances, SSE passed on unbuffered."""
    servers = "".join(f"        server 127.0.0.1:{p};\n" for p in instances)
    temps = "".join(f"    {kind}_temp_path {run_dir / kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    return (
        ("user root;\n" if os.geteuid() == 0 else "")
        + "worker_processes 1;\ndaemon off;\n"
        + f"pid {run_dir / 'nginx.pid'};\nerror_log stderr warn;\n"
        + "events {\n    worker_connections 8192;\n}\n"
        + "http {\n    access_log off;\n"
        + temps
        + "    upstream trioproxy {\n        hash $http_session_id consistent;\n"
        + servers
        + "        keepalive 128;\n        keepalive_timeout 4s;\n    }\n"
        + f"    server {{\n        listen 127.0.0.1:{port} backlog=4096;\n"
        + "        client_max_body_size 40m;\n        client_body_buffer_size 1m;\n"
        + "        location / {\n            proxy_pass http://trioproxy;\n"
        + "            proxy_http_version 1.1;\n"
        + '            proxy_set_header Connection "";\n'
        + "            proxy_buffering off;\n            proxy_read_timeout 15m;\n"
        + "        }\n    }\n}\n"
    )


class Nginx(Process):
    """nginx's master (its worker is a child), whose temporary folder goes when it stops."""

    run_dir: Path

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def start_nginx(port: int, instances: list[int]) -> tuple[Process | None, str]:
    """nginx (`make balancers` unpacks Debian's) in front of `instances`, its config and temp
    folders in a temporary folder; without the binary, why not."""
    if not os.access(NGINX, os.X_OK):
        return None, f"nginx not installed at {NGINX} (make balancers)"
    run_dir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    conf = run_dir / "nginx.conf"
    conf.write_text(nginx_config(run_dir, port, instances))
    # The shared libraries unpacked beside the binary, for packages that need them.
    libs = sorted({str(p.parent) for p in BALANCERS.rglob("*.so*")}) if BALANCERS.exists() else []
    inherited = os.environ.get("LD_LIBRARY_PATH")
    env = {"LD_LIBRARY_PATH": ":".join([*libs, *([inherited] if inherited else [])])}
    argv = [str(NGINX), "-p", str(run_dir), "-e", "stderr", "-c", str(conf)]
    nginx = Nginx("nginx", argv, env=env)
    nginx.run_dir = run_dir
    return nginx, ""


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
    server: Process | Group | None,
    budget: float,
    *,
    instances: list[str] | None = None,
    balancer: Process | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """One contender at one concurrency: a closed loop, or with `rate` (turns/s) P1's open
    loop. `instances`: the trioproxy instances behind it (their /healthz says how each turn
    went upstream); `balancer`: a process in front whose CPU is reported apart."""
    own = name in ("trioproxy", "trioproxy_lanes")
    instances = instances if instances is not None else ([target] if own else [])
    health0 = [await proxy_health(base) for base in instances]
    before, cpu0 = await fake_stats(fake), server.cpu_seconds() if server else 0.0
    lb0 = tree_cpu_seconds(balancer.proc.pid) if balancer else 0.0

    def clock_started() -> None:  # the open loop's first turns are not counted: nor their CPU
        nonlocal cpu0, lb0
        cpu0 = server.cpu_seconds() if server else 0.0
        lb0 = tree_cpu_seconds(balancer.proc.pid) if balancer else 0.0

    result = await load.run(
        name, target, sessions, turns, budget=budget, rate=rate, on_start=clock_started
    )
    cpu1 = server.cpu_seconds() if server else 0.0
    lb1 = tree_cpu_seconds(balancer.proc.pid) if balancer else 0.0
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
    if rate is not None:
        row.update(open_loop=True, rate=rate, late_starts=result.late)
    if balancer is not None:
        row["balancer_cpu_s_per_1k_events"] = (lb1 - lb0) / (result.events / 1000)
    if instances:  # how the proxy sent them: suffix or full, and any retries
        health1 = [await proxy_health(base) for base in instances]
        for key in ("turns", "retries"):
            counts: dict[str, int] = {}
            for h0, h1 in zip(health0, health1, strict=True):
                for k, v in h1[key].items():
                    counts[k] = counts.get(k, 0) + v - h0.get(key, {}).get(k, 0)
            row[f"proxy_{key}"] = {k: v for k, v in counts.items() if v}
        # Upstream sockets: handshakes during the row, and open at its end.
        pairs = zip(health0, health1, strict=True)
        row["handshakes"] = sum(h1["opened"] - h0["opened"] for h0, h1 in pairs)
        row["upstream_sockets"] = sum(h1["live"] for h1 in health1)
        if len(instances) > 1:  # how the balancer spread the turns
            row["instance_turns"] = [
                sum(h1["turns"].values()) - sum(h0["turns"].values())
                for h0, h1 in zip(health0, health1, strict=True)
            ]
    if sessions == 1 and sent:  # one session's turns, in order: the plot's bytes per turn
        kind = "ws" if after["ws_turns"] > before["ws_turns"] else "http"
        row["turn_bytes"] = after["recent_sizes"][kind][-sent:]
    status = "ok" if not result.errors else f"{result.errors} errors: {result.first_error}"
    if instances:
        status += f" {row['proxy_turns']} retries {row['proxy_retries']}"
    if "instance_turns" in row:
        status += f" per instance {row['instance_turns']}"
    if rate is not None:
        status += f" (open loop at {rate:.1f}/s, {result.late} late starts)"
    if result.cut:
        status += f" (cut at {budget:.0f} s)"
    print(
        f"  {name:12s} x{sessions:<4d} {row['turns_per_s']:8.1f} turns/s "
        f"TTFE p50 {row['ttfe_p50_ms']:.2f} ms  {status}",
        flush=True,
    )
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
    "lanes on": ["--lanes"],
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


async def main(
    profile: str, contenders: list[str], sweep: list[int] | None = None, extras: bool = True
) -> dict[str, Any]:
    settings = {**PROFILES[profile], **({"sweep": sweep} if sweep else {})}
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    fake_port, proxy_port, litellm_port = free_port(), free_port(), free_port()
    codex_lb_port, floor_port, nginx_port = free_port(), free_port(), free_port()
    instance_ports = [free_port(), free_port()]
    lanes_port = free_port()
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
    laned: Process | None = None
    if "trioproxy_lanes" in contenders:  # the same proxy with sessions on shared sockets
        laned = proxy_process("trioproxy-lanes", lanes_port, fake_port, "--lanes")
        servers.append(laned)
    floor: Process | None = None
    if "floor" in contenders:
        floor = floor_process(floor_port, fake_port)
        servers.append(floor)
    litellm_bin = Path(os.environ.get("BENCH_VENV", ROOT / ".bench-venv")) / "bin" / "litellm"
    litellm: Process | None = None
    skipped: dict[str, str] = {}
    # Two trioproxy instances behind nginx, against the same fake as the single one.
    pair: list[Process] = []
    nginx: Process | None = None
    if "trioproxy_x2" in contenders:
        nginx, why = start_nginx(nginx_port, instance_ports)
        if nginx is None:
            skipped["trioproxy_x2"] = why
        else:
            pair = [
                proxy_process(f"trioproxy-{n}", port, fake_port)
                for n, port in enumerate(instance_ports, 1)
            ]
            servers += [*pair, nginx]
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
    instance_urls = [f"http://127.0.0.1:{port}/v1" for port in instance_ports]
    try:
        for base in (fake, *fakes.values()):
            assert await wait_http(f"{base}/_fake/stats"), "a fake upstream did not start"
        assert await wait_http(f"http://127.0.0.1:{proxy_port}/healthz"), "trioproxy did not start"
        if floor is not None:
            assert await wait_http(f"http://127.0.0.1:{floor_port}/healthz"), "no floor"
        if laned is not None:
            assert await wait_http(f"http://127.0.0.1:{lanes_port}/healthz"), "no lanes proxy"
        if nginx is not None:
            for port in instance_ports:
                assert await wait_http(f"http://127.0.0.1:{port}/healthz"), "an instance failed"
            if not await wait_http(f"http://127.0.0.1:{nginx_port}/healthz", 20):
                skipped["trioproxy_x2"] = "nginx did not start (see bench/results/nginx.log)"
                nginx = None
        if litellm is not None and not await wait_http(
            f"http://127.0.0.1:{litellm_port}/health/liveliness", 180
        ):
            skipped["litellm"] = "LiteLLM did not start (see bench/results/litellm.log)"
            litellm = None
        if codex_lb is not None and not await setup_codex_lb(codex_lb_port):
            skipped["codex_lb"] = "codex-lb did not start (see bench/results/codex_lb.log)"
            codex_lb = None
        # name: (target, the server(s) whose CPU is its own, options for `measure`)
        targets: dict[str, tuple[str, Process | Group | None, dict[str, Any]]] = {
            "direct": (fake_ws, None, {}),
            "trioproxy": (f"http://127.0.0.1:{proxy_port}/v1", proxy, {}),
            "trioproxy_lanes": (f"http://127.0.0.1:{lanes_port}/v1", laned, {}),
            "floor": (f"http://127.0.0.1:{floor_port}/v1", floor, {}),
            "trioproxy_x2": (
                f"http://127.0.0.1:{nginx_port}/v1",
                Group(pair),
                {"instances": instance_urls, "balancer": nginx},
            ),
            "full_http": (f"{fake}/v1", None, {}),
            "litellm": (f"http://127.0.0.1:{litellm_port}/v1", litellm, {}),
            "codex_lb": (f"http://127.0.0.1:{codex_lb_port}/v1", codex_lb, {}),
        }
        # Warm-up: imports, caches and the first connections out of the measured runs.
        for name in contenders:
            if name in targets and name not in skipped:
                await load.run(name, targets[name][0], 2, 2)
        if nginx is not None:  # each instance too, whichever the two sessions hashed to
            for url in instance_urls:
                await load.run("trioproxy", url, 2, 2)
        rows = []
        for sessions in settings["sweep"]:
            print(f"{sessions} concurrent sessions x {settings['turns']} turns", flush=True)
            for name in contenders:
                if name in skipped or name not in targets:
                    continue
                target, server, options = targets[name]
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
                        **options,
                    )
                )
        # P1 under an open loop: turn starts at half the proxy's closed-loop capacity at that
        # concurrency (its turns/s above), the same rate for every contender.
        # (A cut run's turns/s is what it completed in its budget: still its capacity.)
        capacity = {r["sessions"]: r["turns_per_s"] for r in rows
                    if r["contender"] == "trioproxy" and r["turns_per_s"]}  # fmt: skip
        open_sweep = [s for s in (1, 64) if s in capacity]
        if capacity and 64 not in capacity and max(capacity) > 1:
            open_sweep.append(max(capacity))
        open_rows = []
        for sessions in open_sweep:
            rate = capacity[sessions] / 2
            # Each session's first turn is sent before the clock starts and not counted.
            fit = int(settings["open_seconds"] * rate / sessions)
            turns = 1 + min(settings["turns"] - 1, max(5, fit))
            print(
                f"open loop: {sessions} session(s) x {turns} turns, the first uncounted, then "
                f"{rate:.1f} turns/s (half the proxy's closed-loop capacity)",
                flush=True,
            )
            budget = max(settings["budget"], 3 * sessions * turns / rate)
            for name in OPEN_LOOP:
                if name in contenders and name not in skipped:
                    target, server, options = targets[name]
                    open_rows.append(
                        await measure(
                            name, target, sessions, turns, fake, server, budget, rate=rate
                        )
                    )
        long = None
        if extras:
            print(f"one session x {settings['long']} turns (bytes)", flush=True)
            long = await long_session(settings["long"], fake, fake_ws, targets["trioproxy"][0])
    finally:
        for server in reversed(servers):
            server.stop()
    idle = {}
    if extras:
        print(f"idle pool: {settings['idle']} sessions", flush=True)
        for name, variant in IDLE_VARIANTS.items():
            idle[name] = idle_pool(settings["idle"], *variant)
            print(f"  {name}: {idle[name]['kib_per_socket']:.1f} KiB per idle socket", flush=True)
    return {
        "profile": profile,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": settings,
        "rows": rows,
        "open_loop": open_rows,
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

    out += p1_targets(data)
    long = data["long_session"]
    if long is None:  # a run without the long session and the idle pool (--no-extras)
        out.append(("P2, P4", None, "not measured (--no-extras)"))
        return out
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
        verdict = "-" if ok is None else "PASS" if ok else "FAIL"
        lines.append(f"| {name} | {verdict} | {detail} |")
    lines += ["", *floor_ratios(data), "", *open_loop_table(data), "", *two_instances(data)]
    lines += ["", *lanes_table(data)]
    return "\n".join(lines)


def _find(rows: list[dict[str, Any]], name: str, sessions: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["contender"] == name and r["sessions"] == sessions), None)


def _added(rows: list[dict[str, Any]], r: dict[str, Any], q: str) -> float:
    """Time to first event (`q`: p50 or p99) over direct's at the same concurrency and load."""
    base = _find(rows, "direct", r["sessions"])
    return r[f"ttfe_{q}_ms"] - base[f"ttfe_{q}_ms"] if base else float("nan")


def _ratio(proxy: float | None, floor: float | None) -> str:
    """trioproxy / floor; against a floor that adds under 0.5 ms over direct a ratio means
    nothing (at 16 sessions it can be +0.1 ms, or below direct's)."""
    if proxy is None or floor is None or floor != floor:
        return "n/a"
    return f"{proxy / floor:.1f}x" if floor >= 0.5 else "floor ~ direct"


def p1_targets(data: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """P1 from the open loop (1 and 64 sessions); the closed loop's figure beside it, which at
    saturation is queueing. Before open loops were measured: the closed loop's alone."""
    rows, opened = data["rows"], data.get("open_loop") or []
    out: list[tuple[str, bool | None, str]] = []
    for sessions in sorted({r["sessions"] for r in opened}):
        proxy, floor = _find(opened, "trioproxy", sessions), _find(opened, "floor", sessions)
        if proxy is None or _find(opened, "direct", sessions) is None:
            continue
        a50, a99 = _added(opened, proxy, "p50"), _added(opened, proxy, "p99")
        closed = _find(rows, "trioproxy", sessions)
        where = f"{sessions} session{'s' if sessions > 1 else ''}"
        detail = (
            f"open loop at {proxy['rate']:.1f} turns/s (half the proxy's closed-loop "
            f"capacity at {where}), {proxy['turns'] // sessions} turns a session after the "
            f"first: p50 {a50:+.2f} ms, p99 {a99:+.2f} ms"
        )
        if floor is not None:
            f50, f99 = _added(opened, floor, "p50"), _added(opened, floor, "p99")
            detail += (
                f"; floor p50 {f50:+.2f} ms, p99 {f99:+.2f} ms (trioproxy/floor "
                f"{_ratio(a50, f50)} / {_ratio(a99, f99)})"
            )
        if closed is not None and _find(rows, "direct", sessions) is not None:
            detail += (
                f"; closed loop p50 {_added(rows, closed, 'p50'):+.2f} ms, "
                f"p99 {_added(rows, closed, 'p99'):+.2f} ms"
            )
        out.append((f"P1 added TTFE at {where}: p50 <= 1 ms, p99 <= 5 ms", a50 <= 1 and a99 <= 5,
                     detail))  # fmt: skip
    proxy64, direct64 = _find(rows, "trioproxy", 64), _find(rows, "direct", 64)
    if not out and proxy64 and direct64:
        a50, a99 = _added(rows, proxy64, "p50"), _added(rows, proxy64, "p99")
        out.append(("P1 added TTFE at 64 sessions: p50 <= 1 ms, p99 <= 5 ms", a50 <= 1 and a99 <= 5,
                    f"closed loop: p50 {a50:+.2f} ms, p99 {a99:+.2f} ms"))  # fmt: skip
    return out


def floor_ratios(data: dict[str, Any]) -> list[str]:
    """trioproxy's CPU per event and added time to first event as multiples of the floor's."""
    lines = [
        "### trioproxy/floor (bench/floor.py: the same planner on bare trio + h11 + wsproto)",
        "",
        "| load | sessions | CPU s/1k events trioproxy / floor | ratio | added TTFE p50 ms "
        "trioproxy / floor | ratio | added p99 ms trioproxy / floor | ratio | turns/s ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    found = False
    for load_name, rows in (("closed", data["rows"]), ("open", data.get("open_loop") or [])):
        for sessions in sorted({r["sessions"] for r in rows}):
            proxy, floor = _find(rows, "trioproxy", sessions), _find(rows, "floor", sessions)
            if proxy is None or floor is None:
                continue
            found = True
            pc, fc = proxy["cpu_s_per_1k_events"], floor["cpu_s_per_1k_events"]
            p50, f50 = _added(rows, proxy, "p50"), _added(rows, floor, "p50")
            p99, f99 = _added(rows, proxy, "p99"), _added(rows, floor, "p99")
            kind = load_name if load_name == "closed" else f"open, {proxy['rate']:.1f} turns/s"
            lines.append(
                f"| {kind} | {sessions} | {pc:.3f} / {fc:.3f} | {pc / fc:.2f}x | "
                f"{p50:+.2f} / {f50:+.2f} | {_ratio(p50, f50)} | {p99:+.2f} / {f99:+.2f} | "
                f"{_ratio(p99, f99)} | {proxy['turns_per_s'] / floor['turns_per_s']:.2f} |"
            )
    if not found:
        return ["trioproxy/floor: no floor in this run (`--contenders` left it out)"]
    return lines


def open_loop_table(data: dict[str, Any]) -> list[str]:
    opened = data.get("open_loop") or []
    if not opened:
        return ["P1 open loop: not measured in this run (it needs trioproxy's closed loop)"]
    lines = [
        "### P1 under an open loop",
        "",
        "Turn starts at a fixed rate, half the proxy's closed-loop capacity at that concurrency, "
        "the same for every contender; each session's first turn uncounted; a session still "
        "waits for its own last turn (late starts).",
        "",
        "| contender | sessions | offered turns/s | turns/s | TTFE p50 ms | TTFE p99 ms "
        "| added p50 ms | added p99 ms | late starts | CPU s/1k events | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in opened:
        cpu = "-" if r["cpu_s_per_1k_events"] is None else f"{r['cpu_s_per_1k_events']:.3f}"
        name = f"{r['contender']} (cut at {r['wall_s']:.0f} s)" if r.get("cut") else r["contender"]
        lines.append(
            f"| {name} | {r['sessions']} | {r['rate']:.1f} | {r['turns_per_s']:.1f} | "
            f"{r['ttfe_p50_ms']:.2f} | {r['ttfe_p99_ms']:.2f} | {_added(opened, r, 'p50'):+.2f} | "
            f"{_added(opened, r, 'p99'):+.2f} | {r['late_starts']} | {cpu} | {r['errors']} |"
        )
    return lines


def lanes_table(data: dict[str, Any]) -> list[str]:
    """trioproxy with `--lanes` beside its default (a socket per session), same load."""
    rows = data["rows"]
    laned = [r for r in rows if r["contender"] == "trioproxy_lanes" and not r.get("open_loop")]
    if not laned:
        return ["Lanes: not run (`--contenders` left trioproxy_lanes out)"]
    lines = [
        "### Lanes on beside off (sessions on named lanes of shared sockets)",
        "",
        "| sessions | lanes | handshakes | upstream sockets at the end | turns/s | TTFE p50 ms"
        " | CPU s/1k events | upstream B/turn | retries | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in laned:
        off = next(
            (o for o in rows if o["contender"] == "trioproxy" and o["sessions"] == r["sessions"]
             and not o.get("open_loop")),
            None,
        )  # fmt: skip
        for label, row in (("off", off), ("on", r)):
            if row is None:
                continue
            cpu = row["cpu_s_per_1k_events"]
            lines.append(
                f"| {row['sessions']} | {label} | {row.get('handshakes', '-')} | "
                f"{row.get('upstream_sockets', '-')} | {row['turns_per_s']:.1f} | "
                f"{row['ttfe_p50_ms']:.2f} | {'-' if cpu is None else f'{cpu:.3f}'} | "
                f"{row['upstream_bytes_per_turn']:,.0f} | {row.get('proxy_retries') or '-'} | "
                f"{row['errors']} |"
            )
    return lines


def two_instances(data: dict[str, Any]) -> list[str]:
    """Two trioproxy instances behind nginx (hashing `session-id`) beside one instance."""
    if "trioproxy_x2" in data["skipped"]:
        return [f"2 instances behind nginx: {data['skipped']['trioproxy_x2']}"]
    rows = data["rows"]
    pairs = [r for r in rows if r["contender"] == "trioproxy_x2"]
    if not pairs:
        return ["2 instances behind nginx: not run (`--contenders` left it out)"]
    lines = [
        "### 2 trioproxy instances behind nginx (1 worker, `hash $http_session_id consistent`)",
        "",
        "| sessions | turns/s | x one instance | TTFE p50 ms | TTFE p99 ms | instances' CPU "
        "s/1k events | nginx CPU s/1k events (master + worker) | turns per instance | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in pairs:
        one = _find(rows, "trioproxy", r["sessions"])
        scale = f"{r['turns_per_s'] / one['turns_per_s']:.2f}" if one else "-"
        split = " / ".join(str(n) for n in r.get("instance_turns", []))
        lines.append(
            f"| {r['sessions']} | {r['turns_per_s']:.1f} | {scale} | {r['ttfe_p50_ms']:.2f} | "
            f"{r['ttfe_p99_ms']:.2f} | {r['cpu_s_per_1k_events']:.3f} | "
            f"{r['balancer_cpu_s_per_1k_events']:.3f} | {split} | {r['errors']} |"
        )
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--report-only", action="store_true", help="re-render latest.json")
    parser.add_argument("--sweep", help="concurrencies instead of the profile's, e.g. 1,64")
    parser.add_argument(
        "--no-extras", action="store_true", help="skip the long session and the idle pool (P2, P4)"
    )
    args = parser.parse_args()
    latest = ROOT / "bench" / "results" / "latest.json"
    if args.report_only:
        data = json.loads(latest.read_text())
    else:
        sweep = [int(n) for n in args.sweep.split(",")] if args.sweep else None
        contenders = args.contenders.split(",")
        data = trio.run(main, args.profile, contenders, sweep, not args.no_extras)
        latest.write_text(json.dumps(data, indent=2, default=str))
    text = render(data)
    (ROOT / "bench" / "results" / "latest.md").write_text(text + "\n")
    print(text)
