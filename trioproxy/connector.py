"""How an upstream socket is opened, and what its failures mean to a client.

`websocket_connector` is the production way (tests pass in-memory ones with the same shape);
`handshake_error` maps a refused or failed handshake to the error the client sees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
)

from trioproxy import errors
from trioproxy.config import Settings
from trioproxy.errors import ApiError
from trioproxy.wsclient import ClientSocket, open_websocket

Headers = list[tuple[bytes, bytes]]
Connector = Callable[[str, Headers], AbstractAsyncContextManager[ClientSocket]]


def websocket_connector(settings: Settings) -> Connector:
    """The production connector: a real (TLS where `wss://`) WebSocket client that offers
    permessage-deflate unless `settings.permessage_deflate` is off. `connect_timeout` bounds
    the whole opening, the upgrade's answer included."""

    @asynccontextmanager
    async def connect(url: str, headers: Headers) -> AsyncIterator[ClientSocket]:
        async with open_websocket(
            url,
            headers,
            deflate=settings.permessage_deflate,
            events_context=settings.deflate_events_context,
            connect_timeout=settings.connect_timeout,
            close_timeout=settings.close_timeout,
            max_message_size=settings.max_message_bytes,
        ) as sock:
            yield sock

    return connect


def close_detail(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"code {reason.code}" + (f" ({reason.reason})" if reason.reason else "")


def closed_error(sock: ClientSocket, exc: ConnectionClosed) -> ApiError:
    """Why a socket closed, for the clients of its turns. The upstream's own 1009 ("message too
    big") answers the message just sent: that request is too large for it (413), and sending
    it again on another socket, shared by other sessions' lanes, would only close that one."""
    reason = exc.reason
    if reason is not None and reason.code == _TOO_BIG and sock.closed_by_peer:
        return errors.upstream_message_too_large(close_detail(exc))
    return errors.upstream_closed(close_detail(exc))


_TOO_BIG = 1009  # RFC 6455 7.4.1


def handshake_error(exc: BaseException) -> ApiError:
    """Map a failed connect or upgrade to the error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConnectionRejected):
        return errors.from_handshake_rejection(exc.status_code, exc.body)
    if isinstance(exc, ConnectionTimeout):
        return errors.upstream_unreachable("the handshake timed out")
    if isinstance(exc, HandshakeError) and exc.__cause__ is not None:
        return errors.upstream_unreachable(str(exc.__cause__) or type(exc.__cause__).__name__)
    return errors.upstream_unreachable(str(exc) or type(exc).__name__)
