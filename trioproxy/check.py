"""`trioproxy check`: the configuration read as `serve` reads it, and one upstream handshake
per upstream it would use, so an operator learns of a wrong key or an unreachable provider
before the users do.

Pass-through mode has no key of its own: the handshake uses `OPENAI_API_KEY` when it is set
(as the SDK would), else it only checks that the upstream answers the upgrade (a 401 then still
proves it is reachable and speaks the protocol). Managed mode tries each channel with its key; a
held login tries the Codex backend with the login's token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

from trioproxy import keys
from trioproxy.codex_auth import CodexAuthError, CodexLogin, held_login
from trioproxy.config import Settings, redacted_url
from trioproxy.connector import handshake_error, websocket_connector
from trioproxy.managed import Managed
from trioproxy.targets import managed_targets


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    url: str
    headers: list[tuple[str, str]]
    keyless: bool = False  # a 401 is the expected answer: the upstream is there


async def probes(
    settings: Settings, managed: Managed | None, login: CodexLogin | None
) -> list[Probe]:
    """What `serve` would connect to, with the credential each would use."""
    if managed is not None:
        return [
            Probe(
                f"channel {name}",
                target.url,
                target.upstream([], None, scope_of(managed, name)).headers,
            )
            for name, target in managed_targets(settings, managed).items()
        ]
    if login is not None:
        token = await login.access_token()
        headers = [
            ("authorization", f"Bearer {token}"),
            ("chatgpt-account-id", login.account_id),
            ("originator", settings.codex_originator),
        ]
        return [Probe("held ChatGPT login", settings.chatgpt_ws, headers)]
    key = os.environ.get("OPENAI_API_KEY", "")
    headers = [("authorization", f"Bearer {key}")] if key else []
    return [Probe("upstream", settings.upstream_ws, headers, keyless=not key)]


def scope_of(managed: Managed, channel: str) -> str:
    """A scope that may use `channel` (the handshake carries none of it; a name is needed)."""
    return next((k.scope for k in managed.keys if channel in k.channels), "check")


async def run(settings: Settings, managed: Managed | None, login: CodexLogin | None) -> int:
    """Print one line per upstream; 0 when every one accepted the upgrade."""
    try:
        found = await probes(settings, managed, login)
    except CodexAuthError as exc:
        print(f"FAIL held ChatGPT login: {exc}")
        return 1
    connect = websocket_connector(settings)
    failed = 0
    for probe in found:
        shown = redacted_url(probe.url)
        sent = [
            (n.encode("latin-1"), v.encode("latin-1"))
            for n, v in keys.forwarded(probe.headers, settings.beta)
        ]
        try:
            async with connect(probe.url, sent) as sock:
                deflate = "yes" if sock.deflate else "no"
                print(f"ok   {probe.name}: {shown} accepted the upgrade (deflate {deflate})")
        except Exception as exc:
            error = handshake_error(exc)
            if probe.keyless and error.status == 401:
                print(
                    f"ok   {probe.name}: {shown} answers (401 without a key: set OPENAI_API_KEY "
                    "to check one)"
                )
                continue
            failed += 1
            print(f"FAIL {probe.name}: {shown}: {error.status} {error.code}: {error.message}")
    return 1 if failed else 0


def main(settings: Settings, managed: Managed | None) -> int:
    return trio.run(run, settings, managed, held_login(settings))
