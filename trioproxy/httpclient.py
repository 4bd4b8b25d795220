"""A small HTTP/1.1 client on h11 and trio, for the proxy's few plain-HTTP calls upstream.

The proxy speaks HTTP upstream for two things only: Codex's model list (`GET .../models`) and
the OAuth token refresh. Both are one request, one bounded response, so one connection per
request (`Connection: close`) keeps this free of pooling and keep-alive state. h11 does the
framing (content-length, chunked, close-delimited); trio does the socket and TLS.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from trioproxy import __version__

USER_AGENT = f"trioproxy/{__version__}"
_READ_CHUNK = 65536


class HttpError(Exception):
    """The request could not be made or its response could not be read."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-case
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


async def _connect(scheme: str, host: str, port: int) -> trio.abc.Stream:
    if scheme == "https":
        return await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=_ssl_context(), https_compatible=True
        )
    return await trio.open_tcp_stream(host, port)


async def request(
    method: str,
    url: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    max_bytes: int = 16 * 2**20,
) -> HttpResponse:
    """One request, the whole response. Raises `HttpError` on any transport failure.

    No timeout of its own: callers bound it with `trio.fail_after`, as trio code does.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http(s) URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    names = {name.lower() for name, _ in headers or []}
    out: list[tuple[str, str]] = [("host", host), ("connection", "close")]
    if "user-agent" not in names:
        out.append(("user-agent", USER_AGENT))
    out += [(n, v) for n, v in headers or [] if n.lower() not in ("host", "connection")]
    out.append(("content-length", str(len(body))))
    conn = h11.Connection(h11.CLIENT)
    try:
        stream = await _connect(parts.scheme, parts.hostname, port)
        async with stream:
            await stream.send_all(
                conn.send(h11.Request(method=method, target=target, headers=out))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
            return await _read_response(conn, stream, max_bytes)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, ssl.SSLError) as exc:
        raise HttpError(f"{method} {url}: {exc or type(exc).__name__}") from exc


async def _read_response(
    conn: h11.Connection, stream: trio.abc.Stream, max_bytes: int
) -> HttpResponse:
    status = 0
    headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_READ_CHUNK)))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_bytes:
                raise HttpError(f"response larger than {max_bytes} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status, headers, b"".join(chunks))
        elif isinstance(event, h11.ConnectionClosed):
            raise HttpError("connection closed before the response ended")
