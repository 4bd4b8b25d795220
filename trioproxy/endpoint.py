"""Where a URL points, and a byte stream to it: shared by the WebSocket and HTTP clients.

Every outbound connection (the upstream WebSocket, the model list, compaction, the HTTP
fallback, the token endpoint) is opened here, so each honours what Codex and the SDK honour:
`HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` (an `http://` egress proxy, reached with an HTTP
CONNECT tunnel, `user:password@` sent as Proxy-Authorization) unless `NO_PROXY` names the host
(domains, addresses, CIDR networks), and `SSL_CERT_FILE` / `SSL_CERT_DIR` or
`TRIOPROXY_CA_FILE` for a private CA. httpx honours these too, but it cannot carry the
WebSocket, so one tunnel here serves both clients rather than two stacks.

One TLS context for the process: building the default one loads the CA bundle, about 40 ms of
CPU on this machine, which every new upstream socket used to pay.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import os
import ssl
import urllib.request
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import h11
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
    """The default client context (certificate and host checks on), built once; it trusts
    `SSL_CERT_FILE`/`SSL_CERT_DIR` (OpenSSL reads them) and `TRIOPROXY_CA_FILE` too."""
    context = ssl.create_default_context()
    extra = os.environ.get("TRIOPROXY_CA_FILE")
    if extra:
        context.load_verify_locations(cafile=extra)
    return context


@dataclass(frozen=True, slots=True)
class EgressProxy:
    host: str
    port: int
    authorization: str | None = None  # a Proxy-Authorization value, from the URL's userinfo


class ProxyError(OSError):
    """The egress proxy refused the tunnel or did not answer as an HTTP proxy does."""


def egress_proxy(endpoint: Endpoint) -> EgressProxy | None:
    """The HTTP proxy the environment names for this endpoint, if any, unless `NO_PROXY`
    names the host (see `bypassed`). Raises `ProxyError` for a proxy URL it cannot use."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get("https" if endpoint.tls else "http") or proxies.get("all")
    if not url or bypassed(endpoint.host, proxies.get("no", "")):
        return None
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        port = parts.port or 8080
    except ValueError as exc:
        raise ProxyError(f"the egress proxy URL {url!r} is not usable: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ProxyError(
            f"the egress proxy must be an http:// URL (HTTP CONNECT), not {parts.scheme}://"
        )
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    return EgressProxy(parts.hostname, port, authorization)


def bypassed(host: str, no_proxy: str) -> bool:
    """Whether `NO_PROXY` names `host`: `*`, a domain and its subdomains (a leading dot
    optional), an address or a network in CIDR (`10.0.0.0/8`, `::1`, `[::1]`); a `:port` on
    an entry is ignored."""
    host = host.strip("[]").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("["):
            entry = entry[1:].split("]", 1)[0]
        elif entry.count(":") == 1:
            entry = entry.split(":", 1)[0]
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            domain = entry.lstrip(".")
            if host == domain or host.endswith("." + domain):
                return True
            continue
        if address is not None and address in network:
            return True
    return False


def check_environment() -> None:
    """Refuse at start-up a proxy variable no connection could use (`socks5://`, a bad
    port), rather than failing every upstream connection later."""
    for tls in (True, False):
        egress_proxy(Endpoint("check.invalid", 443 if tls else 80, "/", tls))


async def open_stream(endpoint: Endpoint) -> trio.abc.Stream:
    """TCP (through the egress proxy's tunnel where one applies), with TLS where the scheme
    asks for it."""
    via = egress_proxy(endpoint)
    if via is None:
        if not endpoint.tls:
            return await trio.open_tcp_stream(endpoint.host, endpoint.port)
        return await trio.open_ssl_over_tcp_stream(
            endpoint.host, endpoint.port, ssl_context=tls_context(), https_compatible=True
        )
    stream: trio.abc.Stream = await trio.open_tcp_stream(via.host, via.port)
    try:
        await _connect(stream, endpoint, via)
        if endpoint.tls:
            tls = trio.SSLStream(
                stream, tls_context(), server_hostname=endpoint.host, https_compatible=True
            )
            await tls.do_handshake()
            stream = tls
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _connect(stream: trio.abc.Stream, endpoint: Endpoint, via: EgressProxy) -> None:
    """`CONNECT host:port` on the proxy's connection; returns once it answered 2xx."""
    conn = h11.Connection(h11.CLIENT)
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    authority = f"{host}:{endpoint.port}"
    headers = [("host", authority)]
    if via.authorization is not None:
        headers.append(("proxy-authorization", via.authorization))
    request = h11.Request(method="CONNECT", target=authority, headers=headers)
    await stream.send_all(conn.send(request))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16384)
            if not data:
                raise ProxyError(f"the egress proxy {via.host}:{via.port} closed the tunnel")
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Response):
            if not 200 <= event.status_code < 300:
                raise ProxyError(
                    f"the egress proxy {via.host}:{via.port} refused CONNECT {authority}: "
                    f"{event.status_code}"
                )
            return
        if isinstance(event, h11.InformationalResponse):
            continue
        raise ProxyError(f"the egress proxy {via.host}:{via.port} answered {event!r}")
