"""What every surface of the app shares: the settings, the pool, the turn runner, who may
send what (the gate), the held login, and the one way a request is admitted."""

from __future__ import annotations

from dataclasses import dataclass

from quart import g, request

from trioproxy import access
from trioproxy.codex_auth import CodexLogin
from trioproxy.config import Settings
from trioproxy.managed import Managed
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry
from trioproxy.targets import Target
from trioproxy.telemetry import Telemetry
from trioproxy.validate import check_headers


@dataclass(frozen=True, slots=True)
class AppContext:
    settings: Settings
    proxy: Proxy
    registry: Registry
    telemetry: Telemetry
    gate: access.Gate
    login: CodexLogin | None
    managed: Managed | None

    async def admitted(
        self, route: access.Route, headers: list[tuple[str, str]]
    ) -> tuple[Target, str | None, bytes]:
        """Who sent it and where it goes, then its body; raises the `ApiError` a refusal is.
        Marks the body read, so the app's last hook knows not to drain it."""
        target, scope = self.gate.resolve(headers, route)
        check_headers(headers)
        raw = await request.get_data(cache=False, as_text=False)
        g.body_read = True
        return target, scope, raw if isinstance(raw, bytes) else raw.encode()
