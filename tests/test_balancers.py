"""Scale-out behind real load balancers: nginx and HAProxy (Debian's packages, unpacked by
`make balancers`) in front of two `trioproxy serve` processes, running the configs in deploy/.

A session's `previous_response_id` resolves only on its own upstream socket, so the balancer must
send every request of a session to the same instance: it hashes the session header, else the
credential. What these tests show, for each balancer:

- a session's turns land on one instance: one upstream socket, the first turn in full, then
  suffixes; WebSocket clients too, across reconnects;
- 32 sessions spread over both instances;
- header-less clients stick to an instance by their credential;
- an instance stopped (SIGTERM: it drains) or killed (SIGKILL) hands its sessions to the other
  at the cost of one full-input turn each; its turns in flight end in an error the client can
  tell from success; the other instance's sessions keep their suffixes.

The proxies and balancers are real processes on free ports of 127.0.0.1; the fake upstream runs
in the test's own process, so what went upstream can be read from it. Nothing sleeps longer than
a poll. Without the balancers' binaries the tests skip, or fail under CI (`CI` set).
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import request_body, sse_events, user
from trioproxy import keys
from trioproxy.fake import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BALANCERS_DIR = Path(os.environ.get("TRIOPROXY_BALANCERS_DIR", ROOT / ".tools/balancers"))
VENV_BIN = Path(sys.executable).parent
KEY = "sk-test-key"


def _load_render() -> Callable[[str, dict[str, str], list[str]], str]:
    """deploy/render.py's `render`, the one operators run (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    render: Callable[[str, dict[str, str], list[str]], str] = module.render
    return render


render = _load_render()
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def binary(name: str) -> Path:
    """The balancer unpacked by `make balancers` (its absence fails the test)."""
    path = BALANCERS_DIR / "usr" / "sbin" / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: `make balancers` unpacks it from Debian's packages")
    return path


def missing(name: str) -> Any:
    """Skip a balancer whose binary is absent, saying why; never under CI (`CI` set)."""
    path = BALANCERS_DIR / "usr" / "sbin" / name
    return pytest.mark.skipif(
        not IN_CI and not os.access(path, os.X_OK),
        reason=f"{path} is missing: `make balancers` unpacks nginx and HAProxy from Debian's "
        "packages (under CI this fails instead)",
    )


def balancer_env() -> dict[str, str]:
    """The shared libraries unpacked beside the binaries (liblua, libopentracing, ...)."""
    dirs = sorted({str(p.parent) for p in BALANCERS_DIR.rglob("*.so*")})
    inherited = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join([*dirs, *([inherited] if inherited else [])])}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def wait_for(url: str, process: trio.Process, log: Path, status: int = 200) -> None:
    """Until `url` answers `status`; a process that exits first fails with its log."""
    async with httpx.AsyncClient(timeout=2) as client:
        with trio.fail_after(20):
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"{log} exited: {tail(log)}")
                try:
                    if (await client.get(url)).status_code == status:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)


@dataclass
class Instance:
    """One `trioproxy serve` process."""

    port: int
    process: trio.Process
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            reply = await client.get(f"http://{self.address}/healthz")
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        return data


async def start_instance(fake: FakeUpstream, tmp: Path, number: int, grace: float) -> Instance:
    port = free_port()
    log = tmp / f"trioproxy-{number}.log"
    command = [str(VENV_BIN / "trioproxy"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "TRIOPROXY_UPSTREAM": fake.url, "TRIOPROXY_SHUTDOWN_GRACE": str(grace)}
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [*command, "--upstream", fake.url], env=env, stdout=out, stderr=out
        )
    return Instance(port, process, log)


@dataclass
class Balancer:
    kind: str
    port: int
    process: trio.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_balancer(kind: str, instances: list[Instance], tmp: Path) -> Balancer:
    """deploy/nginx.conf or deploy/haproxy.cfg, rendered for these instances, run unprivileged
    from a folder of its own (as root, nginx's workers stay root: `user root`)."""
    program = binary(kind)
    port = free_port()
    run_dir = tmp / kind
    run_dir.mkdir()
    template = (DEPLOY / ("nginx.conf" if kind == "nginx" else "haproxy.cfg")).read_text()
    values = {
        "TP_LISTEN": f"127.0.0.1:{port}",
        "TP_RUN_DIR": str(run_dir),
        "TP_USER": "root" if os.geteuid() == 0 else getpass.getuser(),
    }
    config = render(template, values, [i.address for i in instances])
    path = run_dir / ("nginx.conf" if kind == "nginx" else "haproxy.cfg")
    path.write_text(config)
    if kind == "nginx":
        command = [str(program), "-p", str(run_dir), "-c", str(path), "-e", "stderr"]
        command += ["-g", "daemon off;"]  # in the foreground, as under systemd
    else:
        command = [str(program), "-db", "-f", str(path)]
    log = run_dir / "stderr.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            command, env=balancer_env(), stdout=out, stderr=out
        )
    return Balancer(kind, port, process, log)


@dataclass
class Cluster:
    fake: FakeUpstream
    instances: list[Instance]
    balancer: Balancer

    def instance(self, address: str) -> Instance:
        return next(i for i in self.instances if i.address == address)


async def stop(process: trio.Process, signum: int) -> None:
    if process.returncode is None:
        process.send_signal(signum)
        with trio.move_on_after(10):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest, fake: FakeUpstream, tmp_path: Path
) -> AsyncIterator[Cluster]:
    """Two trioproxy instances behind `request.param`: the balancer (nginx or haproxy) and the
    instances' shutdown grace in seconds."""
    kind, grace = request.param
    binary(kind)  # before starting anything
    instances: list[Instance] = []
    balancer: Balancer | None = None
    try:
        for number in (1, 2):
            instances.append(await start_instance(fake, tmp_path, number, grace))
        async with trio.open_nursery() as starting:  # both start at once
            for i in instances:
                url = f"http://{i.address}/healthz"
                starting.start_soon(wait_for, url, i.process, i.log)
        balancer = await start_balancer(kind, instances, tmp_path)
        await wait_for(f"{balancer.url}/healthz", balancer.process, balancer.log)
        yield Cluster(fake, instances, balancer)
    finally:
        # The instances are killed: SIGTERM makes one that served a client WebSocket in the last
        # 20 s wait out hypercorn's 10 s graceful timeout (its ping task outlives the socket).
        # nginx's master must stop its workers itself: SIGTERM for the balancers.
        with trio.CancelScope(shield=True):
            for instance in instances:
                await stop(instance.process, signal.SIGKILL)
            if balancer is not None:
                await stop(balancer.process, signal.SIGTERM)


def balancers(grace: float = 5.0) -> list[Any]:
    """The `cluster` parameters: each balancer, with the instances' shutdown grace."""
    kinds = ("nginx", "haproxy")
    return [pytest.param((kind, grace), id=kind, marks=missing(kind)) for kind in kinds]


# -- a client that echoes each response's output back, as Codex and SDK users do ---------------


@dataclass
class Conversation:
    """One client conversation: its history, and who served each turn."""

    name: str
    session: str | None  # the `session-id` header, or None for a header-less client
    key: str = KEY
    header: str = "session-id"  # which of the session headers trioproxy honours it sends
    history: list[Any] = field(default_factory=list)
    served_by: list[str] = field(default_factory=list)  # the instance that answered each turn
    tried: list[list[str]] = field(default_factory=list)  # every instance tried, each turn

    def headers(self) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.key}"}
        if self.session is not None:
            headers[self.header] = self.session
        return headers

    def next_text(self, directive: str = "") -> str:
        """Each user message names its conversation: the upstream's record maps back to it."""
        turn = sum(1 for item in self.history if item.get("role") == "user") + 1
        return f"{self.name} turn {turn}" + (f"\n{directive}" if directive else "")


def served_by(reply: httpx.Response) -> list[str]:
    """Every instance the balancer tried for this request, the one that answered last."""
    return [a.strip() for a in reply.headers["x-served-by"].split(",")]


async def turn(client: httpx.AsyncClient, conv: Conversation, stream: bool = True) -> str:
    """One turn, echoing the output into the history; the instance that answered."""
    conv.history.append(user(conv.next_text()))
    body = request_body(list(conv.history), stream=stream)
    reply = await client.post("/v1/responses", json=body, headers=conv.headers())
    assert reply.status_code == 200, reply.text
    if stream:
        events = sse_events(reply.text)
        assert events[-1][0] == "response.completed", events[-1]
        response = events[-1][1]["response"]
    else:
        response = reply.json()
    conv.history.extend(response["output"])
    where = served_by(reply)
    conv.tried.append(where)
    conv.served_by.append(where[-1])
    return where[-1]


async def turns(client: httpx.AsyncClient, convs: list[Conversation]) -> None:
    """One turn of each conversation, all at once."""
    async with trio.open_nursery() as nursery:
        for conv in convs:
            nursery.start_soon(turn, client, conv)


@dataclass(frozen=True)
class Upstream:
    """One `response.create` as the fake upstream received it."""

    socket: int
    mode: str  # "full" (no previous_response_id) or "suffix"
    items: int


def upstream_by_conversation(fake: FakeUpstream) -> dict[str, list[Upstream]]:
    """What went upstream for each conversation, in order (named by its first user text)."""
    out: dict[str, list[Upstream]] = {}
    for received in fake.creates():
        message = received.message
        texts = [
            part["text"]
            for item in message["input"]
            if item.get("role") == "user"
            for part in item["content"]
        ]
        name = texts[0].split(" turn ")[0]
        mode = "suffix" if message.get("previous_response_id") else "full"
        out.setdefault(name, []).append(Upstream(received.socket, mode, len(message["input"])))
    return out


def lb_client(cluster: Cluster) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=cluster.balancer.url, timeout=30)


# -- (a) one session, one instance, one socket; (b) spread; (c) header-less by credential ----


@pytest.mark.parametrize("cluster", balancers(), indirect=True)
async def test_sessions_stick_to_one_instance_and_spread_over_both(cluster: Cluster) -> None:
    """(a) a four-turn session: one instance, one upstream socket, full then suffixes; (b) 32
    sessions: both instances get some; (c) header-less clients stick by their credential."""
    fake = cluster.fake
    async with lb_client(cluster) as client:
        # (a) a four-turn conversation with a session header.
        solo = Conversation("solo", "solo-session")
        for _ in range(4):
            await turn(client, solo)
        assert len(set(solo.served_by)) == 1, solo.served_by
        home = cluster.instance(solo.served_by[0])
        other = next(i for i in cluster.instances if i is not home)
        sent = upstream_by_conversation(fake)["solo"]
        assert [u.mode for u in sent] == ["full", "suffix", "suffix", "suffix"]
        assert len({u.socket for u in sent}) == 1 and fake.sockets_opened == 1
        assert [u.items for u in sent] == [1, 1, 1, 1]  # each suffix: only the new user message
        home_health, other_health = await home.health(), await other.health()
        assert home_health["turns"] == {"full": 1, "suffix": 3}
        assert home_health["opened"] == 1 and other_health["turns"] == {}

        # (b) 32 sessions at once, two turns each: every one keeps its instance and socket.
        many = [Conversation(f"spread{n:02d}", f"spread-{n:02d}") for n in range(32)]
        for _ in range(2):
            await turns(client, many)
        by_instance = {i.address: 0 for i in cluster.instances}
        sent_all = upstream_by_conversation(fake)
        for conv in many:
            assert len(set(conv.served_by)) == 1, (conv.name, conv.served_by)
            by_instance[conv.served_by[0]] += 1
            sent = sent_all[conv.name]
            assert [u.mode for u in sent] == ["full", "suffix"], (conv.name, sent)
            assert sent[0].socket == sent[1].socket
        print(f"\n{cluster.balancer.kind}: 32 sessions over two instances: {by_instance}")
        assert all(count > 0 for count in by_instance.values()), by_instance
        for instance in cluster.instances:
            expected = by_instance[instance.address] + (1 if instance is home else 0)
            assert (await instance.health())["opened"] == expected

        # (c) header-less clients: every conversation of one key on one instance (trioproxy
        # continues each from its content), and some other key lands on the other instance.
        # (One after the other: trioproxy hands an idle socket of the key to an unrelated
        # header-less request, so interleaved header-less conversations go in full.)
        plain = [Conversation(f"plain{n}", None) for n in range(3)]
        for conv in plain:
            for _ in range(2):
                await turn(client, conv, stream=False)
        assert len({a for conv in plain for a in conv.served_by}) == 1
        sent_all = upstream_by_conversation(fake)
        for conv in plain:
            assert [u.mode for u in sent_all[conv.name]] == ["full", "suffix"], conv.name
        first_home = plain[0].served_by[0]
        for n in range(64):
            conv = Conversation(f"key{n}", None, key=f"{KEY}-{n}")
            await turn(client, conv, stream=False)
            await turn(client, conv, stream=False)
            assert conv.served_by[0] == conv.served_by[1], conv.served_by
            if conv.served_by[0] != first_home:
                break
        else:
            raise AssertionError("64 API keys all hashed to one instance")


SESSION_HEADERS = [
    "session-id",
    "session_id",
    "x-session-id",
    "x-session-affinity",
    "x-conversation-id",
    "x-thread-id",
]


@pytest.mark.parametrize("cluster", balancers(), indirect=True)
async def test_the_balancer_hashes_every_session_header_trioproxy_honours(
    cluster: Cluster,
) -> None:
    """One session sent under each header name trioproxy takes (the same session to it) stays
    on one instance: the one its id hashes to, not the one its credential hashes to."""
    assert list(keys.SESSION_HEADERS) == SESSION_HEADERS  # the configs name these, in order
    async with lb_client(cluster) as client:
        by_key = Conversation("bykey", None)
        await turn(client, by_key, stream=False)
        for n in range(64):  # a session whose id lands elsewhere than its credential would
            conv = Conversation(f"spelled{n}", f"spelled-{n}")
            if await turn(client, conv, stream=False) != by_key.served_by[0]:
                break
        else:
            raise AssertionError("64 session ids all hashed to the credential's instance")
        for header in SESSION_HEADERS[1:]:
            conv.header = header
            await turn(client, conv, stream=False)
        # Two session headers: the first in trioproxy's order counts, for the balancer too.
        conv.header = "session-id"
        conv.history.append(user(conv.next_text()))
        reply = await client.post(
            "/v1/responses",
            json=request_body(list(conv.history)),
            headers={**conv.headers(), "x-thread-id": "another-session"},
        )
        assert reply.status_code == 200, reply.text
        conv.served_by.append(served_by(reply)[-1])
    assert len(set(conv.served_by)) == 1, conv.served_by
    sent = upstream_by_conversation(cluster.fake)[conv.name]
    assert [u.mode for u in sent] == ["full"] + ["suffix"] * len(SESSION_HEADERS)
    assert len({u.socket for u in sent}) == 1


@pytest.mark.parametrize("cluster", balancers(), indirect=True)
async def test_websocket_clients_reach_their_session_across_reconnects(cluster: Cluster) -> None:
    """A client WebSocket through the balancer (Upgrade passed on): two turns, a reconnect, a
    third turn: one instance, one upstream socket, full then suffixes."""
    url = cluster.balancer.url.replace("http://", "ws://") + "/v1/responses"
    headers = [(b"authorization", f"Bearer {KEY}".encode()), (b"session-id", b"ws-session")]
    history: list[Any] = []

    async def ws_turn(ws: Any, text: str) -> None:
        history.append(user(text))
        create = {"type": "response.create", **request_body(list(history))}
        await ws.send_message(json.dumps(create))
        with trio.fail_after(10):
            while True:
                event = json.loads(await ws.get_message())
                assert event["type"] not in ("error", "response.failed"), event
                if event["type"] == "response.completed":
                    history.extend(event["response"]["output"])
                    return

    async with open_websocket_url(url, extra_headers=headers) as ws:
        await ws_turn(ws, "websocket turn 1")
        await ws_turn(ws, "websocket turn 2")
    async with open_websocket_url(url, extra_headers=headers) as ws:
        await ws_turn(ws, "websocket turn 3")
    sent = upstream_by_conversation(cluster.fake)["websocket"]
    assert [u.mode for u in sent] == ["full", "suffix", "suffix"]
    assert len({u.socket for u in sent}) == 1
    healths = [await i.health() for i in cluster.instances]
    assert sorted(h["turns"].get("suffix", 0) for h in healths) == [0, 2]


# -- (d) an instance stops or dies -----------------------------------------------------------


@dataclass
class InFlight:
    """A streaming turn running while its instance goes away, and how it ended for the client."""

    conv: Conversation
    directive: str
    stream: bool = True
    events: list[str] = field(default_factory=list)
    status: int | None = None
    served_by: list[str] = field(default_factory=list)
    outcome: str = ""  # "completed", "error+failed: CODE", "http STATUS", "transport: ...", ...

    async def run(
        self, client: httpx.AsyncClient, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        text = self.conv.next_text(self.directive)
        body = request_body([*self.conv.history, user(text)], stream=self.stream)
        started = False
        try:
            async with client.stream(
                "POST", "/v1/responses", json=body, headers=self.conv.headers()
            ) as reply:
                self.status = reply.status_code
                self.served_by = served_by(reply)
                if not self.stream:
                    task_status.started()
                    started = True
                    await reply.aread()
                    self.outcome = f"http {reply.status_code}"
                    if reply.status_code == 200:
                        self.conv.history += [user(text), *reply.json()["output"]]
                    return
                data: dict[str, Any] = {}
                async for line in reply.aiter_lines():
                    if line.startswith("event: "):
                        self.events.append(line[len("event: ") :])
                        if not started:
                            task_status.started()
                            started = True
                    elif line.startswith("data: "):
                        data = json.loads(line[len("data: ") :])
                end = self.events[-1] if self.events else ""
                if end == "response.completed":
                    self.outcome = "completed"
                    self.conv.history += [user(text), *data["response"]["output"]]
                elif self.events[-2:] == ["error", "response.failed"]:
                    code = data["response"]["error"]["code"]
                    self.outcome = f"error+failed: {code}"
                else:
                    self.outcome = f"truncated after {end or 'nothing'}"  # the silent kind
        except httpx.HTTPError as exc:
            self.outcome = f"transport: {type(exc).__name__}: {exc}"
        finally:
            if not started:
                task_status.started()


async def place(
    client: httpx.AsyncClient, cluster: Cluster, per_instance: int
) -> dict[str, list[Conversation]]:
    """Sessions with two turns done, until each instance holds `per_instance` of them."""
    held: dict[str, list[Conversation]] = {i.address: [] for i in cluster.instances}
    for n in range(64):
        conv = Conversation(f"moving{n:02d}", f"moving-{n:02d}")
        await turn(client, conv)
        await turn(client, conv)
        held[conv.served_by[0]].append(conv)
        if all(len(convs) >= per_instance for convs in held.values()):
            return held
    raise AssertionError(f"64 sessions did not reach both instances: {held}")


async def wait_in_flight(fake: FakeUpstream, conv: Conversation, turns_before: int) -> None:
    """Until the fake upstream is working on the conversation's next turn."""
    with trio.fail_after(10):
        # (the state belongs to the fake upstream's tasks)
        while len(upstream_by_conversation(fake).get(conv.name, [])) <= turns_before:  # noqa: ASYNC110
            await trio.sleep(0.01)


def assert_moved_and_kept(
    cluster: Cluster, moved: list[Conversation], kept: list[Conversation], survivor: Instance
) -> None:
    """The victim's sessions: now on the survivor, with exactly one full-input turn there; the
    survivor's own: never a full turn after their first."""
    sent = upstream_by_conversation(cluster.fake)
    for conv in moved:
        assert conv.served_by[-2:] == [survivor.address] * 2, (conv.name, conv.served_by)
        ups = sent[conv.name]
        on_survivor = ups[[u.mode for u in ups].index("full", 1) :]  # after the victim's turns
        assert [u.mode for u in on_survivor] == ["full"] + ["suffix"] * (len(on_survivor) - 1)
        assert len({u.socket for u in on_survivor}) == 1, (conv.name, ups)
    for conv in kept:
        assert set(conv.served_by) == {survivor.address}, (conv.name, conv.served_by)
        ups = sent[conv.name]
        assert [u.mode for u in ups] == ["full"] + ["suffix"] * (len(ups) - 1), (conv.name, ups)
        assert len({u.socket for u in ups}) == 1


def refused_while_draining(instance: Instance) -> int:
    """Turns the instance answered with 503 `shutting_down` (its log says so)."""
    lines = instance.log.read_text().splitlines()
    return sum(
        '"code":"shutting_down"' in line and '"path":"/v1/responses"' in line for line in lines
    )


@pytest.mark.parametrize("cluster", balancers(grace=2.5), indirect=True)
async def test_sigterm_drains_then_the_other_instance_takes_the_sessions(
    cluster: Cluster,
) -> None:
    """SIGTERM: the instance answers 503 to new turns (the balancer re-sends them to the other
    instance), lets a short turn in flight finish, ends a long one at the grace (2.5 s) with
    `error` + `response.failed`, and exits."""
    async with lb_client(cluster) as client:
        held = await place(client, cluster, per_instance=4)
        victim, survivor = cluster.instances
        moved, kept = held[victim.address], held[survivor.address]
        short = InFlight(moved[0], "fake: slow 0.03")  # ~0.5 s: finishes within the grace
        long = InFlight(moved[1], "fake: long 40\nfake: slow 0.2")  # ~9 s: cut at the grace
        async with trio.open_nursery() as nursery:
            for flight in (short, long):
                await nursery.start(flight.run, client)
            victim.process.send_signal(signal.SIGTERM)
            await wait_for(f"http://{victim.address}/healthz", victim.process, victim.log, 503)
            # Draining: every other session's next turn, the victim's included.
            others = [c for c in moved + kept if c not in (short.conv, long.conv)]
            began = trio.current_time()
            await turns(client, others)
            draining_round = trio.current_time() - began
        with trio.fail_after(10):
            await victim.process.wait()
        assert victim.process.returncode == 0
        await turns(client, moved + kept)  # the victim is gone now: all on the survivor
        await turns(client, moved + kept)
    print(
        f"\n{cluster.balancer.kind} SIGTERM: short turn in flight: {short.outcome}; long one: "
        f"{long.outcome}; {len(others)} turns sent while draining took {draining_round:.3f} s, "
        f"{refused_while_draining(victim)} of them refused with 503 by the victim and re-sent "
        f"by the balancer; instances tried: {[c.tried[-3] for c in others if c in moved]}"
    )
    assert short.outcome == "completed", short
    assert long.outcome.startswith("error+failed: "), long
    assert_moved_and_kept(cluster, moved, kept, survivor)


@pytest.mark.parametrize("cluster", balancers(), indirect=True)
async def test_sigkill_moves_sessions_and_cut_turns_end_in_an_error(cluster: Cluster) -> None:
    """SIGKILL: nothing drains. A streaming turn already answering is cut: the client sees an
    error, not a stream that just ends. A turn not yet answered is re-sent by the balancer to
    the other instance (its one full-input turn there)."""
    async with lb_client(cluster) as client:
        held = await place(client, cluster, per_instance=4)
        victim, survivor = cluster.instances
        moved, kept = held[victim.address], held[survivor.address]
        streaming = InFlight(moved[0], "fake: long 40\nfake: slow 0.1")
        waiting = InFlight(moved[1], "fake: slow 0.1", stream=False)  # answers only at its end
        async with trio.open_nursery() as nursery:
            await nursery.start(streaming.run, client)
            nursery.start_soon(waiting.run, client)
            await wait_in_flight(cluster.fake, waiting.conv, 2)
            victim.process.kill()
            others = [c for c in moved + kept if c not in (streaming.conv, waiting.conv)]
            began = trio.current_time()
            await turns(client, others)
            killed_round = trio.current_time() - began
        await victim.process.wait()
        await turns(client, moved + kept)
        await turns(client, moved + kept)
    print(
        f"\n{cluster.balancer.kind} SIGKILL: streaming turn cut after {len(streaming.events)} "
        f"events: {streaming.outcome}; non-streaming turn: {waiting.outcome}, instances tried: "
        f"{waiting.served_by}; {len(others)} turns right after the kill took {killed_round:.3f} s"
    )
    assert streaming.outcome.startswith("transport: RemoteProtocolError"), streaming.outcome
    assert waiting.outcome == "http 200" and waiting.served_by[-1] == survivor.address
    if cluster.balancer.kind == "nginx":  # its header names every instance tried
        assert waiting.served_by == [victim.address, survivor.address]
    assert_moved_and_kept(cluster, moved, kept, survivor)
