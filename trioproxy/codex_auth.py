"""A ChatGPT login held by the proxy: Codex's `auth.json`, its tokens, and Codex's refresh flow.

`trioproxy serve --codex-auth` lets clients that are not Codex (the SDK, curl) use a Codex
ChatGPT login. The proxy reads the file Codex wrote, sends its access token and account id
upstream, and refreshes the token the way Codex does (codex-rs `login/src/auth/manager.rs`):

- before use, when the access token's JWT `exp` is near (Codex refreshes at `exp`; we refresh a
  margin earlier so a turn never starts on a token about to lapse), or, for tokens without
  `exp`, when `last_refresh` is more than 8 days old;
- after a 401, first by re-reading the file (Codex or another proxy may have refreshed it
  already; refresh tokens rotate, so refreshing a stale one would fail as "reused"), then by
  asking the token endpoint;
- `POST {token_url}` with JSON `{client_id, grant_type: "refresh_token", refresh_token}`; the
  answer's `id_token`, `access_token` and `refresh_token` (each optional) replace the old ones
  and `last_refresh` becomes now.

The refreshed file is written back atomically (a temp file in the same directory with the
original's permissions, then rename), so a Codex CLI sharing it never reads half a file and keeps
working. One refresh at a time: concurrent turns that all saw the token expire share one.
No token ever reaches a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import trio

from trioproxy import httpclient

if TYPE_CHECKING:
    from trioproxy.config import Settings

log = logging.getLogger("trioproxy.codex_auth")

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"  # Codex CLI's OAuth client id
DEFAULT_TOKEN_URL = "https://auth.openai.com/oauth/token"
TOKEN_URL_OVERRIDE_ENV = "CODEX_REFRESH_TOKEN_URL_OVERRIDE"  # Codex honours it too
REFRESH_INTERVAL = 8 * 24 * 3600  # Codex's TOKEN_REFRESH_INTERVAL for tokens without `exp`
REFRESH_MARGIN = 5 * 60
_AUTH_CLAIMS = "https://api.openai.com/auth"
# Refresh failures after which only a new `codex login` helps (Codex's classification).
_PERMANENT = {
    "refresh_token_expired": "the refresh token has expired",
    "refresh_token_reused": "the refresh token was already used",
    "refresh_token_invalidated": "the refresh token was revoked",
}


class CodexAuthError(Exception):
    """The login cannot be used; the message says what to do (never contains a token)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent  # retrying with the same refresh token cannot help


def default_path() -> Path:
    home = os.environ.get("CODEX_HOME") or str(Path.home() / ".codex")
    return Path(home) / "auth.json"


def default_token_url() -> str:
    return os.environ.get(TOKEN_URL_OVERRIDE_ENV) or DEFAULT_TOKEN_URL


# -- pure ------------------------------------------------------------------------------------
def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (the issuer verifies; we only read `exp` and ids)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return {}
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str
    account_id: str | None
    last_refresh: float | None  # epoch seconds

    @property
    def expires_at(self) -> float | None:
        exp = jwt_claims(self.access_token).get("exp")
        return float(exp) if isinstance(exp, int | float) else None

    def needs_refresh(self, now: float, margin: float = REFRESH_MARGIN) -> bool:
        expires = self.expires_at
        if expires is not None:
            return expires - margin <= now
        return self.last_refresh is not None and now - self.last_refresh > REFRESH_INTERVAL


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _format_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def tokens_of(doc: Any) -> Tokens:
    """The tokens of a parsed `auth.json`, or `CodexAuthError` saying why there are none."""
    if not isinstance(doc, dict):
        raise CodexAuthError("is not a JSON object")
    tokens = doc.get("tokens")
    if not isinstance(tokens, dict) or not isinstance(tokens.get("access_token"), str):
        if doc.get("OPENAI_API_KEY"):
            raise CodexAuthError(
                "holds an API key, not a ChatGPT login: send that key as the bearer instead"
            )
        raise CodexAuthError("has no ChatGPT tokens: run `codex login` first")
    account = tokens.get("account_id")
    if not isinstance(account, str) or not account:
        claims = jwt_claims(str(tokens.get("id_token", ""))).get(_AUTH_CLAIMS, {})
        account = claims.get("chatgpt_account_id") if isinstance(claims, dict) else None
    refresh = tokens.get("refresh_token")
    return Tokens(
        access_token=tokens["access_token"],
        refresh_token=refresh if isinstance(refresh, str) else "",
        account_id=account if isinstance(account, str) and account else None,
        last_refresh=_parse_time(doc.get("last_refresh")),
    )


def refresh_request(refresh_token: str) -> bytes:
    return orjson.dumps(
        {"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": refresh_token}
    )


def apply_refresh(doc: dict[str, Any], answer: Any, now: float) -> dict[str, Any]:
    """`doc` with the token endpoint's answer applied, as Codex's `persist_tokens` does.

    Every other key of the file (and of `tokens`) is kept: the file belongs to Codex.
    """
    if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
        raise CodexAuthError("the token endpoint answered without an access_token")
    tokens = dict(doc.get("tokens") or {})
    for name in ("id_token", "access_token", "refresh_token"):
        if isinstance(answer.get(name), str) and answer[name]:
            tokens[name] = answer[name]
    return {**doc, "tokens": tokens, "last_refresh": _format_time(now)}


def refresh_failure(status: int, body: bytes) -> CodexAuthError:
    code: Any = None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        code = error.get("code") if isinstance(error, dict) else error
        code = code if isinstance(code, str) else parsed.get("code")
    reason = _PERMANENT.get(str(code).lower()) if code else None
    if reason:
        return CodexAuthError(
            f"token refresh failed: {reason}; run `codex login` again", permanent=True
        )
    # Codex treats a 401 from the token endpoint as final too.
    return CodexAuthError(f"token refresh failed with HTTP {status}", permanent=status == 401)


# -- the login, with its I/O ----------------------------------------------------------------
def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CodexAuthError(f"{path} does not exist: run `codex login` first") from None
    except (OSError, ValueError) as exc:
        raise CodexAuthError(f"{path} cannot be read: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise CodexAuthError(f"{path} is not a JSON object")
    return doc


def _write_atomically(path: Path, doc: dict[str, Any]) -> None:
    """Replace `path` in one rename, keeping its permissions (0600 for a new file)."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, temp = tempfile.mkstemp(prefix=".auth.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@asynccontextmanager
async def _exclusive(directory: Path) -> AsyncIterator[None]:
    """An advisory lock on `directory`, polled so waiting for it stays cancellable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await trio.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class CodexLogin:
    """The proxy's hold on one `auth.json`: current tokens, refreshed as Codex would."""

    def __init__(self, path: Path, token_url: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.token_url = token_url
        self.timeout = timeout
        self.refreshes = 0
        self._lock = trio.Lock()
        # Refresh tokens the endpoint refused for good, and why: asked again, the answer is
        # the same, so until the file holds a new login the proxy fails fast, as Codex does.
        self._dead: dict[str, CodexAuthError] = {}
        doc = _read(path)
        try:
            self._tokens = tokens_of(doc)
        except CodexAuthError as exc:
            raise CodexAuthError(f"{path} {exc}") from None
        if self._tokens.account_id is None:
            raise CodexAuthError(f"{path} has no ChatGPT account id: run `codex login` again")

    @property
    def account_id(self) -> str:
        assert self._tokens.account_id is not None
        return self._tokens.account_id

    async def access_token(self) -> str:
        """A token good for at least the refresh margin, refreshing first if need be."""
        tokens = self._tokens
        if tokens.needs_refresh(time.time()):
            await self._refresh(tokens.access_token)
        return self._tokens.access_token

    async def unauthorized(self, rejected: str) -> str:
        """The upstream refused `rejected`: a newer token, from the file or the endpoint."""
        await self._refresh(rejected, force=True)
        return self._tokens.access_token

    async def _refresh(self, stale: str, *, force: bool = False) -> None:
        async with self._lock, _exclusive(self.path.parent):
            # The directory lock makes this read-refresh-write one step across processes
            # (hypercorn workers sharing the file), so no two spend the same refresh token.
            if self._tokens.access_token != stale:
                return  # another turn refreshed while this one waited for the lock
            doc = await trio.to_thread.run_sync(_read, self.path)
            on_disk = tokens_of(doc)
            if on_disk.access_token != stale and (force or not on_disk.needs_refresh(time.time())):
                log.info("using the token another process refreshed in %s", self.path)
                self._tokens = on_disk
                return
            if not on_disk.refresh_token:
                raise CodexAuthError(f"{self.path} has no refresh token: run `codex login`")
            if on_disk.refresh_token in self._dead:
                raise self._dead[on_disk.refresh_token]
            try:
                answer = await self._ask(on_disk.refresh_token)
            except CodexAuthError as exc:
                if exc.permanent:
                    self._dead[on_disk.refresh_token] = exc
                raise
            updated = apply_refresh(doc, answer, time.time())
            await trio.to_thread.run_sync(_write_atomically, self.path, updated)
            self._tokens = tokens_of(updated)
            self.refreshes += 1
            log.info("refreshed the ChatGPT access token and wrote %s", self.path)

    async def _ask(self, refresh_token: str) -> Any:
        try:
            with trio.fail_after(self.timeout):
                reply = await httpclient.request(
                    "POST",
                    self.token_url,
                    headers=[
                        ("content-type", "application/json"),
                        ("accept", "application/json"),
                    ],
                    body=refresh_request(refresh_token),
                )
        except httpclient.HttpError as exc:
            raise CodexAuthError(f"token refresh failed: {exc}") from None
        except trio.TooSlowError:
            raise CodexAuthError(f"token endpoint silent for {self.timeout:g} s") from None
        if reply.status != 200:
            raise refresh_failure(reply.status, reply.body)
        try:
            return json.loads(reply.body)
        except ValueError:
            raise CodexAuthError("the token endpoint answered with invalid JSON") from None


def held_login(settings: Settings) -> CodexLogin | None:
    """The login `--codex-auth` names, or None: as `serve` and `check` both build it."""
    if not settings.codex_auth:
        return None
    return CodexLogin(
        Path(settings.codex_auth).expanduser(),
        settings.codex_token_url or default_token_url(),
        timeout=settings.connect_timeout,
    )
