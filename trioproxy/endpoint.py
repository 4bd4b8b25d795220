"""Where a URL points, and a byte stream to it: shared by the WebSocket and HTTP clients.

One TLS context for the process: building the default one loads the CA bundle, about 40 ms of
CPU on this machine, which every new upstream socket used to pay.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

import trio

_TLS = {"wss": True, "https": True, "ws": False, "http": False}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Host, port, request target and TLS of a URL, parsed once."""

    SCHEMES: ClassVar[tuple[str, ...]] = ("ws", "wss", "http", "https")

    host: str
    port: int
    resource: str  # path and query: the request target
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """Raises `ValueError` for a URL of another scheme or without a host."""
        parts = urlsplit(url)
        if parts.scheme not in cls.SCHEMES or not parts.hostname:
            raise ValueError(f"not a {'/'.join(cls.SCHEMES)} URL: {url!r}")
        tls = _TLS[parts.scheme]
        port = parts.port or (443 if tls else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, resource, tls)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The default client context (certificate and host checks on), built once."""
    return ssl.create_default_context()


async def open_stream(endpoint: Endpoint) -> trio.abc.Stream:
    """TCP, with TLS where the scheme asks for it."""
    if not endpoint.tls:
        return await trio.open_tcp_stream(endpoint.host, endpoint.port)
    return await trio.open_ssl_over_tcp_stream(
        endpoint.host, endpoint.port, ssl_context=tls_context(), https_compatible=True
    )
