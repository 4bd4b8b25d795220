"""The real Codex CLI through the proxy: a tool loop on one socket, the second turn a suffix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import trio

from tests.conftest import ProxyServer

ROOT = Path(__file__).resolve().parents[1]
CODEX = Path(os.environ.get("TRIOPROXY_CODEX_BIN", ROOT / ".tools/codex/node_modules/.bin/codex"))

CONFIG = """\
model = "gpt-5"
model_provider = "trioproxy"

[model_providers.trioproxy]
name = "trioproxy"
base_url = "{base_url}"
env_key = "TRIOPROXY_TEST_KEY"
wire_api = "responses"
"""


def codex_home(home: Path, base_url: str) -> Path:
    """A CODEX_HOME whose config points Codex at the proxy; returns the work directory."""
    assert CODEX.exists(), f"Codex CLI missing at {CODEX}: run `make codex` (make test does)"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG.format(base_url=base_url))
    workdir = home.parent / "work"
    workdir.mkdir()
    return workdir


async def run_codex(
    server: ProxyServer, home: Path, prompt: str
) -> subprocess.CompletedProcess[bytes]:
    workdir = codex_home(home, server.base_url)
    env = {
        **os.environ,
        "CODEX_HOME": str(home),
        "TRIOPROXY_TEST_KEY": "sk-codex-test",
        "NO_COLOR": "1",
    }
    with trio.fail_after(90):
        return await trio.run_process(
            [
                str(CODEX),
                "exec",
                "--skip-git-repo-check",
                "--dangerously-bypass-approvals-and-sandbox",
                "-C",
                str(workdir),
                prompt,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_codex_tool_loop_runs_on_one_socket_with_a_suffix_turn(
    server: ProxyServer, tmp_path: Path
) -> None:
    prompt = 'Run the tool, please.\nfake: call exec_command {"cmd": "echo hello-from-tool"}'
    result = await run_codex(server, tmp_path / "codex-home", prompt)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    # Codex ran the tool and came back; the fake model quotes the tool's output.
    assert "The tool returned:" in stdout and "hello-from-tool" in stdout, stdout

    fake = server.fake
    creates = fake.creates()
    assert fake.sockets_opened == 1
    assert len(creates) == 2 and {c.socket for c in creates} == {1}
    first, second = creates
    assert "previous_response_id" not in first.message
    assert "stream" not in first.message  # Codex sends stream: true; it stays off the socket
    assert first.message["store"] is False
    # Turn 2 carries the previous id and only what is new: the tool's output.
    assert second.message["previous_response_id"]
    new_items = second.message["input"]
    assert [item["type"] for item in new_items] == ["function_call_output"], new_items
    assert "hello-from-tool" in str(new_items[0]["output"])
    assert second.message["tools"] == first.message["tools"]
    assert second.size < first.size
    print(f"\nCodex tool loop upstream bytes: turn 1 {first.size}, turn 2 {second.size}")
    headers = fake.handshakes[0]
    assert headers["session-id"] and headers["openai-beta"].endswith(
        "responses_websockets=2026-02-06"
    )
    assert server.proxy.turns["suffix"] == 1 and server.proxy.turns["full"] == 1
