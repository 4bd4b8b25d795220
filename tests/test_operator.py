"""What an operator meets: settings, start-up errors, the command line, logs and health."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from tests.conftest import AUTH, ProxyServer, post, request_body, user
from tests.test_processes import VENV_BIN
from trioproxy import cli, managed
from trioproxy.config import Settings
from trioproxy.fake import FakeUpstream
from trioproxy.logs import TextFormatter


def test_a_misspelt_config_field_is_named_as_unknown(tmp_path: Path) -> None:
    path = tmp_path / "trioproxy.toml"
    path.write_text(
        '[channels.main]\nupstream = "wss://x/v1/responses"\napi_key_env = "K"\n'
        f'[keys.ci]\nsha256 = "{managed.hash_key("k")}"\nscpoe = "ci"\nchannels = ["main"]\n'
    )
    with pytest.raises(managed.ConfigError, match="unknown field 'scpoe'"):
        managed.load(str(path), {"K": "sk"})


def test_an_https_api_base_becomes_its_responses_websocket() -> None:
    assert Settings(upstream="https://api.openai.com/v1").upstream_ws == (
        "wss://api.openai.com/v1/responses"
    )
    azure = "https://x.openai.azure.com/openai/v1/?api-version=1"
    assert Settings(upstream=azure).upstream_ws == (
        "wss://x.openai.azure.com/openai/v1/responses?api-version=1"
    )
    assert Settings(upstream="ws://h:1/v1/responses").upstream_ws == "ws://h:1/v1/responses"


def test_hash_key_refuses_an_empty_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["hash-key"]) == 2
    assert "no key given" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("k\n"))
    assert cli.main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == managed.hash_key("k")


def test_log_flags_work_after_serve_and_a_bad_level_is_one_line() -> None:
    args = cli.build_parser().parse_args(["serve", "--log-format", "text", "--log-level", "debug"])
    assert (args.log_format, args.log_level) == ("text", "DEBUG")
    top = cli.build_parser().parse_args(["--log-format", "text", "serve"])
    assert top.log_format == "text"
    bad = subprocess.run(
        [str(VENV_BIN / "trioproxy"), "serve", "--log-level", "loud"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "'loud' is not one of" in bad.stderr
    assert "Traceback" not in bad.stderr
    helped = cli.build_parser().format_help()
    assert "hash-key" in helped and "fake-upstream" in helped


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [str(VENV_BIN / "trioproxy"), "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert run.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr


async def test_refusals_leave_a_log_line(
    server: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.app")
    async with server.client() as client:
        await client.post("/responses", json=request_body("x"))  # no key: 401
        await post(client, request_body("x"), session="bad\x01id".replace("\x01", " "))
        await client.post("/responses", content=b"x", headers={**AUTH, "content-type": "text/x"})
    lines = [r for r in caplog.records if r.name == "trioproxy.app" and hasattr(r, "fields")]
    assert [(r.fields["status"], r.fields["code"]) for r in lines] == [
        (401, "missing_api_key"),
        (400, "invalid_session_id"),
        (415, "unsupported_media_type"),
    ]
    assert lines[0].levelno == logging.WARNING
    assert all(r.fields["path"] == "/v1/responses" for r in lines)


async def test_a_turn_line_names_its_own_turn_its_timing_and_fails_loudly(
    server: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.turn")
    async with server.client() as client:
        for text in ("hello", "fake: fail server_error"):
            await post(client, request_body([user(text)]), **{"x-client-request-id": "same"})
    ok, failed = [r for r in caplog.records if r.name == "trioproxy.turn"]
    assert ok.fields["request_id"] == failed.fields["request_id"] == "same"
    assert ok.fields["turn_id"] != failed.fields["turn_id"]
    assert ok.fields["duration_ms"] >= ok.fields["first_event_ms"] >= 0
    assert ok.levelno == logging.INFO and failed.levelno == logging.WARNING
    text = TextFormatter().format(failed)
    assert " WARNING trioproxy.turn " in text and "outcome=failed" in text


async def test_health_has_wire_bytes_and_tokens(server: ProxyServer) -> None:
    async with server.client() as client:
        await post(client, request_body([user("hello")]))
        health = (await client.get(server.base_url.removesuffix("/v1") + "/healthz")).json()
    assert health["upstream_wire_bytes"] > 0 and health["input_tokens"] > 0
    assert json.dumps(health)


async def test_check_tries_the_upstream_and_reports_a_wrong_key(fake: FakeUpstream) -> None:
    """`trioproxy check` tries the handshake `serve` would make: one line per upstream."""

    def check(key: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OPENAI_API_KEY": key}
        return subprocess.run(
            [str(VENV_BIN / "trioproxy"), "check", "--upstream", fake.url],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )

    good = await trio.to_thread.run_sync(check, "sk-good")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok   upstream" in good.stdout and "accepted the upgrade" in good.stdout
    fake.refuse_handshakes(401, "invalid_api_key")
    bad = await trio.to_thread.run_sync(check, "sk-bad")
    assert bad.returncode == 1 and "FAIL upstream" in bad.stdout and "401" in bad.stdout
    assert fake.handshakes[0]["authorization"] == "Bearer sk-good"


async def test_status_routes_can_require_a_key_and_413_names_its_limit(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    from tests.conftest import start_proxy

    server = await start_proxy(nursery, fake, metrics_key="m-key", max_body_bytes=1000)
    root = server.base_url.removesuffix("/v1")
    async with server.client() as client:
        for path in ("/healthz", "/metrics"):
            assert (await client.get(root + path)).status_code == 401
            keyed = await client.get(root + path, headers={"authorization": "Bearer m-key"})
            assert keyed.status_code == 200
        big = await post(client, request_body("x" * 2000))
    assert big.status_code == 413
    assert "1,000 bytes; TRIOPROXY_MAX_BODY_BYTES" in big.json()["error"]["message"]


async def test_managed_health_names_the_channels_upstreams(
    tmp_path: Path, nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    from tests.test_managed import gateway_for

    gateway = await gateway_for(nursery, fake, tmp_path, fake.url + "?api-key=sk-in-url")
    async with gateway.client() as client:
        health = (await client.get(gateway.base_url.removesuffix("/v1") + "/healthz")).json()
    assert health["upstream"] is None
    assert health["channels"]["main"] == fake.url + "?api-key=***"


def test_the_text_log_cannot_be_forged_through_a_path() -> None:
    record = logging.LogRecord(
        "trioproxy.app",
        logging.INFO,
        __file__,
        1,
        "refused GET %s: 404",
        ("/x\n2026 FORGED",),
        None,
    )
    record.fields = {"path": "/x\r\nWARNING forged"}
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\\x0a" in line
