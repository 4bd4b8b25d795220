"""Managed mode: proxy keys with scopes, and the upstream channels each key may use.

A team shares one proxy. Each client holds a *proxy key*; the proxy stores only its SHA-256,
finds the key by comparing digests in constant time, and sends the request upstream with the
*channel's* credential (read from an environment variable or a file, never written in the config
or a log). The key's *scope* enters the pool key, so two scopes never share a socket whatever
session id they send, and the proxy remembers which scope made each response id so no scope can
chain from another's response.

The config is TOML (`trioproxy serve --config trioproxy.toml`, or `TRIOPROXY_CONFIG`):

    [server]                      # any Settings field: host, port, idle_ttl, ...
    port = 8787

    [channels.openai]
    upstream = "wss://api.openai.com/v1/responses"
    api_key_env = "OPENAI_API_KEY"        # or: api_key_file = "/run/secrets/openai"
    headers = { "openai-project" = "proj_123" }   # optional, sent upstream

    [keys.team-a-ci]
    sha256 = "<hex sha256 of the proxy key>"      # trioproxy hash-key prints it
    scope = "team-a"
    channels = ["openai"]                          # the first is the default

Every entry can also come from the environment, which wins over the file:
`TRIOPROXY_<SETTING>`, `TRIOPROXY_CHANNEL_<NAME>_<FIELD>`, `TRIOPROXY_KEY_<NAME>_<FIELD>`
(`CHANNELS` as a comma-separated list; names upper-cased, `-` written `_`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tomllib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from trioproxy.config import Settings
from trioproxy.errors import ApiError
from trioproxy.keys import bearer

CHANNEL_HEADER = "x-trioproxy-channel"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")
_ENV_FIELD = re.compile(r"([A-Z0-9_]+?)_(UPSTREAM|API_KEY_ENV|API_KEY_FILE|SHA256|SCOPE|CHANNELS)")


class ConfigError(ValueError):
    """The config cannot be used; the message names the entry (never a secret)."""


def hash_key(key: str) -> str:
    """What the config stores for a proxy key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    upstream: str
    secret: str = field(repr=False)
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ProxyKey:
    name: str
    digest: bytes = field(repr=False)
    scope: str
    channels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Managed:
    keys: tuple[ProxyKey, ...]
    channels: dict[str, Channel]

    def authenticate(self, headers: list[tuple[str, str]]) -> tuple[ProxyKey, Channel]:
        """The key a request presents and the channel it asked for (or its default)."""
        presented = hashlib.sha256(bearer(headers).encode()).digest()
        found: ProxyKey | None = None
        for key in self.keys:  # every digest compared, in constant time: no early exit
            if hmac.compare_digest(presented, key.digest):
                found = key
        if found is None:
            raise ApiError(
                401,
                "Incorrect or missing proxy key: send 'Authorization: Bearer <your proxy key>'.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        wanted = next((v.strip() for n, v in headers if n == CHANNEL_HEADER), found.channels[0])
        if wanted not in found.channels:
            raise ApiError(
                403,
                f"This proxy key may not use channel {wanted!r}.",
                type="invalid_request_error",
                param=CHANNEL_HEADER,
                code="channel_not_allowed",
            )
        return found, self.channels[wanted]


class Ownership:
    """Which scope made which response id (most recent first out): a scope may only chain
    from its own responses. Bounded: ids older than the bound are forgotten. An id the proxy
    never saw (another instance's, or made before a restart) is refused when `strict` (the
    default in managed mode), else left to the upstream to judge."""

    def __init__(self, size: int = 100_000, *, strict: bool = False) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._size = size
        self.strict = strict

    def record(self, response_id: str, scope: str) -> None:
        self._owners[response_id] = scope
        self._owners.move_to_end(response_id)
        if len(self._owners) > self._size:
            self._owners.popitem(last=False)

    def foreign(self, response_id: str, scope: str) -> bool:
        """Whether `scope` may not chain from `response_id`."""
        owner = self._owners.get(response_id)
        if owner is None:
            return self.strict
        return owner != scope


# -- loading ---------------------------------------------------------------------------------------
def load(
    path: str | None, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], Managed | None]:
    """Settings values and the managed config, from the file (if any) and the environment."""
    env = os.environ if env is None else env
    doc: dict[str, Any] = {}
    if path:
        try:
            doc = tomllib.loads(Path(path).expanduser().read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    server = _table(doc, "server")
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(server) - known)
    if unknown:
        raise ConfigError(f"[server] has unknown settings: {', '.join(unknown)}")
    channels = _entries(_table(doc, "channels"), env, "CHANNEL")
    keys = _entries(_table(doc, "keys"), env, "KEY")
    if not keys:
        if channels:
            raise ConfigError("channels are configured but no [keys.NAME] may use them")
        return server, None
    built = {name: _channel(name, entry, env) for name, entry in channels.items()}
    return server, Managed(tuple(_key(n, e, built) for n, e in keys.items()), built)


def _table(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _entries(
    tables: dict[str, Any], env: Mapping[str, str], kind: str
) -> dict[str, dict[str, Any]]:
    """Named entries from the file, then `TRIOPROXY_<KIND>_<NAME>_<FIELD>` over them."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in tables.items():
        if not isinstance(entry, dict) or not _NAME.fullmatch(name):
            raise ConfigError(f"{kind.lower()} {name!r}: expected a [table] named [A-Za-z0-9_-]")
        out[name] = dict(entry)
    prefix = f"TRIOPROXY_{kind}_"
    by_env_name = {name.upper().replace("-", "_"): name for name in out}
    for var, value in env.items():
        if not var.startswith(prefix):
            continue
        rest = var[len(prefix) :]
        match = _ENV_FIELD.fullmatch(rest)
        if match is None:
            raise ConfigError(f"{var}: expected {prefix}<NAME>_<FIELD>")
        name = by_env_name.setdefault(match[1], match[1].lower().replace("_", "-"))
        entry = out.setdefault(name, {})
        entry[match[2].lower()] = value.split(",") if match[2] == "CHANNELS" else value
    return out


def _channel(name: str, entry: dict[str, Any], env: Mapping[str, str]) -> Channel:
    _known("channel", name, entry, _CHANNEL_FIELDS)
    upstream = entry.get("upstream")
    if not isinstance(upstream, str) or "://" not in upstream:
        raise ConfigError(f"channel {name!r}: 'upstream' must be a ws(s):// or http(s):// URL")
    if "api_key_env" in entry:
        secret = env.get(str(entry["api_key_env"]), "")
        source = f"environment variable {entry['api_key_env']}"
    elif "api_key_file" in entry:
        try:
            secret = Path(str(entry["api_key_file"])).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"channel {name!r}: cannot read its api_key_file: {exc}") from None
        source = f"file {entry['api_key_file']}"
    else:
        raise ConfigError(f"channel {name!r}: set api_key_env or api_key_file (never the key)")
    if not secret:
        raise ConfigError(f"channel {name!r}: {source} is empty")
    headers = entry.get("headers", {})
    if not isinstance(headers, dict):
        raise ConfigError(f"channel {name!r}: 'headers' must be a table")
    pairs = tuple((str(k).lower(), str(v)) for k, v in headers.items())
    return Channel(name, upstream, secret, pairs)


_KEY_FIELDS = frozenset({"sha256", "scope", "channels"})
_CHANNEL_FIELDS = frozenset({"upstream", "api_key_env", "api_key_file", "headers"})


def _known(kind: str, name: str, entry: dict[str, Any], fields: frozenset[str]) -> None:
    """A misspelt field (`scpoe`) is named as such, not reported as a missing one."""
    unknown = sorted(set(entry) - fields)
    if unknown:
        raise ConfigError(
            f"{kind} {name!r}: unknown field {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(fields))})"
        )


def _key(name: str, entry: dict[str, Any], channels: dict[str, Channel]) -> ProxyKey:
    _known("key", name, entry, _KEY_FIELDS)
    digest = str(entry.get("sha256", "")).lower()
    if not _HEX.fullmatch(digest):
        raise ConfigError(f"key {name!r}: 'sha256' must be 64 hex digits (trioproxy hash-key)")
    scope = entry.get("scope")
    if not isinstance(scope, str) or not _NAME.fullmatch(scope):
        raise ConfigError(f"key {name!r}: 'scope' must be a name of [A-Za-z0-9_-]")
    allowed = entry.get("channels")
    if not isinstance(allowed, list) or not allowed:
        raise ConfigError(f"key {name!r}: 'channels' must list at least one channel")
    allowed = [str(c).strip() for c in allowed]
    missing = [c for c in allowed if c not in channels]
    if missing:
        raise ConfigError(f"key {name!r}: no such channel: {', '.join(missing)}")
    return ProxyKey(name, bytes.fromhex(digest), scope, tuple(allowed))
