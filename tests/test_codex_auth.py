"""The pure parts of the held login and of the fake's scripts: no sockets, no files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from trioproxy.access import refusal
from trioproxy.codex_auth import (
    CLIENT_ID,
    CodexAuthError,
    CodexLogin,
    _write_atomically,
    apply_refresh,
    jwt_claims,
    refresh_failure,
    refresh_request,
    tokens_of,
)
from trioproxy.config import Settings
from trioproxy.fake.backend import Logins, make_jwt
from trioproxy.fake.script import decide
from trioproxy.keys import bearer
from trioproxy.targets import Target, api_target, http_base


def test_jwt_claims_reads_the_payload_and_tolerates_junk() -> None:
    token = make_jwt({"exp": 123, "https://api.openai.com/auth": {"chatgpt_account_id": "a"}})
    assert jwt_claims(token)["exp"] == 123
    for junk in ("", "abc", "a.b", "a..c", "a.!!!.c", make_jwt({"x": 1}).replace(".", "..")):
        assert jwt_claims(junk) == {}


def test_tokens_of_a_codex_auth_file() -> None:
    doc = Logins().auth_json("acct-1")
    tokens = tokens_of(doc)
    assert tokens.account_id == "acct-1" and tokens.refresh_token.startswith("rt-")
    assert tokens.expires_at is not None and tokens.expires_at > time.time()
    # Without tokens.account_id the id_token's claim is used, as Codex does.
    del doc["tokens"]["account_id"]
    assert tokens_of(doc).account_id == "acct-1"
    with pytest.raises(CodexAuthError, match="API key"):
        tokens_of({"OPENAI_API_KEY": "sk-x"})
    with pytest.raises(CodexAuthError, match="codex login"):
        tokens_of({"OPENAI_API_KEY": None})


def test_refresh_is_due_a_margin_before_exp_or_after_eight_days_without_exp() -> None:
    now = time.time()
    soon = tokens_of(Logins().auth_json("a", lifetime=120))
    later = tokens_of(Logins().auth_json("a", lifetime=3600))
    assert soon.needs_refresh(now) and not later.needs_refresh(now)
    no_exp = {"tokens": {"access_token": "opaque", "refresh_token": "r", "account_id": "a"}}
    fresh = tokens_of({**no_exp, "last_refresh": "2026-11-20T00:00:00Z"})
    assert fresh.last_refresh is not None
    assert not fresh.needs_refresh(fresh.last_refresh + 7 * 86400)
    assert fresh.needs_refresh(fresh.last_refresh + 9 * 86400)
    assert not tokens_of(no_exp).needs_refresh(now)  # nothing says it is stale


def test_refresh_request_is_codexs() -> None:
    assert json.loads(refresh_request("rt-1")) == {
        "client_id": CLIENT_ID,
        "grant_type": "refresh_token",
        "refresh_token": "rt-1",
    }


def test_apply_refresh_replaces_what_came_back_and_keeps_the_rest() -> None:
    tokens = {"id_token": "i", "access_token": "a", "refresh_token": "r", "account_id": "acct"}
    doc = {"OPENAI_API_KEY": None, "tokens": tokens, "last_refresh": "old", "other": 1}
    out = apply_refresh(doc, {"access_token": "a2", "refresh_token": None}, 0.0)
    assert out["tokens"] == {**doc["tokens"], "access_token": "a2"}
    assert out["other"] == 1 and out["last_refresh"] == "1970-01-01T00:00:00Z"
    assert doc["tokens"]["access_token"] == "a"  # the input is not modified
    with pytest.raises(CodexAuthError):
        apply_refresh(doc, {"error": "x"}, 0.0)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"error": {"code": "refresh_token_expired"}}', "expired"),
        (b'{"error": "refresh_token_reused"}', "already used"),
        (b'{"code": "refresh_token_invalidated"}', "revoked"),
        (b"<html>", "HTTP 500"),
    ],
)
def test_refresh_failures_say_what_happened(body: bytes, says: str) -> None:
    assert says in str(refresh_failure(500, body))


def test_write_back_is_atomic_and_keeps_permissions(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text("{}")
    path.chmod(0o640)
    _write_atomically(path, {"tokens": {"access_token": "new"}})
    assert json.loads(path.read_text()) == {"tokens": {"access_token": "new"}}
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["auth.json"]  # no temp file left


def test_a_login_without_an_account_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"tokens": {"access_token": "x", "refresh_token": "r"}}))
    with pytest.raises(CodexAuthError, match="account id"):
        CodexLogin(path, "http://unused")


def test_http_base_of_a_websocket_url() -> None:
    assert (
        http_base("wss://chatgpt.com/backend-api/codex/responses")
        == "https://chatgpt.com/backend-api/codex"
    )
    assert http_base("ws://127.0.0.1:9/v1/responses/") == "http://127.0.0.1:9/v1"


def _user(text: str) -> dict[str, object]:
    return {"role": "user", "content": text}


def _output(text: str) -> dict[str, object]:
    return {"type": "function_call_output", "call_id": "c", "output": text}


def test_steps_script_calls_the_tool_n_times_then_answers() -> None:
    prompt = _user('go\nfake: steps 2 run {"n": "#n"}')
    first = decide([prompt])
    assert first.kind == "call" and json.loads(first.arguments) == {"n": "1"}
    second = decide([prompt, _output("one")])
    assert second.kind == "call" and json.loads(second.arguments) == {"n": "2"}
    done = decide([prompt, _output("one"), _output("two")])
    assert done.kind == "text" and done.text == "The tool returned: two"


def test_slow_script_paces_whatever_else_is_asked() -> None:
    assert decide([_user("hi\nfake: slow 0.5")]).delay == 0.5
    slow_call = decide([_user("fake: slow 0.25\nfake: call f {}")])
    assert slow_call.kind == "call" and slow_call.delay == 0.25
    assert decide([_user("hi")]).delay == 0.0


def test_who_may_use_which_target() -> None:
    settings = Settings()
    api, held = api_target(settings), Target("held", settings.chatgpt_ws, settings.beta)
    with_key = [("authorization", "Bearer local")]
    assert bearer([("authorization", "bearer  tok ")]) == "tok" and bearer([]) == ""
    assert refusal(with_key, api, "") is None
    missing = refusal([], api, "")
    assert missing is not None and missing.code == "missing_api_key"
    assert refusal([], held, "") is None  # loopback, no key: the login is lent to anyone local
    assert refusal(with_key, held, "local") is None
    wrong = refusal([("authorization", "Bearer other")], held, "local")
    assert wrong is not None and wrong.status == 401 and wrong.code == "invalid_api_key"
