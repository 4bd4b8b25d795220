"""A small HTTP/1.1 client on h11 and trio, for the proxy's few plain-HTTP calls upstream.

The proxy speaks HTTP upstream for two things only: Codex's model list (`GET .../models`) and
the OAuth token refresh. Both are one request, one bounded response, so one connection per
request (`Connection: close`) keeps this free of pooling and keep-alive state. h11 does the
framing (content-length, chunked, close-delimited); trio does the socket and TLS.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import trio

from trioproxy import __version__
from trioproxy.endpoint import Endpoint, open_stream

USER_AGENT = f"trioproxy/{__version__}"
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class HttpUrl(Endpoint):
    SCHEMES: ClassVar[tuple[str, ...]] = ("http", "https")


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


class StreamingResponse:
    """A response whose head has arrived; `chunks()` reads the body as it comes."""

    def __init__(
        self, conn: h11.Connection, stream: trio.abc.Stream, head: h11.Response, what: str
    ) -> None:
        self._conn = conn
        self._stream = stream
        self._what = what
        self.status = head.status_code
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                event = await _next(self._conn, self._stream)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpError(f"{self._what}: connection closed before the body ended")
        except _TRANSPORT_ERRORS as exc:
            raise HttpError(f"{self._what}: {exc or type(exc).__name__}") from exc

    async def read(self, max_bytes: int) -> bytes:
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > max_bytes:
                raise HttpError(f"{self._what}: response larger than {max_bytes} bytes")
        return bytes(body)


_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, h11.ProtocolError, ssl.SSLError)


@asynccontextmanager
async def stream(
    method: str,
    url: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> AsyncIterator[StreamingResponse]:
    """Send one request; yield once the response head is in. The connection closes on exit.

    Raises `HttpError` on any transport failure. No timeout of its own: callers bound it
    with `trio.fail_after` or a cancel scope, as trio code does.
    """
    try:
        endpoint = HttpUrl.parse(url)
    except ValueError:
        raise HttpError(f"not an http(s) URL: {url}") from None
    what = f"{method} {url}"
    names = {name.lower() for name, _ in headers or []}
    out: list[tuple[str, str]] = [("host", endpoint.host_header), ("connection", "close")]
    if "user-agent" not in names:
        out.append(("user-agent", USER_AGENT))
    out += [(n, v) for n, v in headers or [] if n.lower() not in ("host", "connection")]
    out.append(("content-length", str(len(body))))
    conn = h11.Connection(h11.CLIENT)
    try:
        connection = await open_stream(endpoint)
    except _TRANSPORT_ERRORS as exc:
        raise HttpError(f"{what}: {exc or type(exc).__name__}") from exc
    async with connection:
        try:
            await connection.send_all(
                conn.send(h11.Request(method=method, target=endpoint.resource, headers=out))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
            while True:
                event = await _next(conn, connection)
                if isinstance(event, h11.Response):
                    break
                if isinstance(event, h11.ConnectionClosed):
                    raise HttpError(f"{what}: connection closed before a response")
        except _TRANSPORT_ERRORS as exc:
            raise HttpError(f"{what}: {exc or type(exc).__name__}") from exc
        yield StreamingResponse(conn, connection, event, what)


async def request(
    method: str,
    url: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    max_bytes: int = 16 * 2**20,
) -> HttpResponse:
    """One request, the whole response. Raises `HttpError` on any transport failure."""
    async with stream(method, url, headers=headers, body=body) as response:
        data = await response.read(max_bytes)
    return HttpResponse(response.status, response.headers, data)


async def _next(conn: h11.Connection, connection: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await connection.receive_some(_READ_CHUNK)))
