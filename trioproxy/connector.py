"""How an upstream socket is opened, and what its failures mean to a client.

`websocket_connector` is the production way (tests pass in-memory ones with the same shape);
`handshake_error` maps a refused or failed handshake to the error the client sees.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio
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

# Beyond connect_timeout, how long the client library may take to give up on its own.
_HANDSHAKE_SLACK = 0.5


def websocket_connector(settings: Settings) -> Connector:
    """The production connector: a real (TLS where `wss://`) WebSocket client that offers
    permessage-deflate unless `settings.permessage_deflate` is off.

    Waiting for the upgrade's answer is bounded, but the client's reader task can stay blocked
    on an upstream that accepted TCP and never answers. An outer cancel scope bounds the whole
    handshake, reader included.
    """

    @asynccontextmanager
    async def connect(url: str, headers: Headers) -> AsyncIterator[ClientSocket]:
        deadline = trio.current_time() + settings.connect_timeout + _HANDSHAKE_SLACK
        with trio.CancelScope(deadline=deadline) as handshake:
            async with open_websocket(
                url,
                headers,
                deflate=settings.permessage_deflate,
                events_context=settings.deflate_events_context,
                connect_timeout=settings.connect_timeout,
                close_timeout=settings.close_timeout,
                max_message_size=settings.max_message_bytes,
            ) as sock:
                handshake.deadline = math.inf
                yield sock
        if handshake.cancelled_caught:
            raise ConnectionTimeout

    return connect


def close_detail(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"code {reason.code}" + (f" ({reason.reason})" if reason.reason else "")


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
