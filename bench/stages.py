"""`trioproxy serve` with a timestamp at each stage of a turn's way to its first event.

Run by `bench/profile.py --sessions 1 --stages`, which prints where the time to first event
goes. It wraps functions of the running proxy (not a copy of them), so what it times is the
product's code path; the wrappers cost a few microseconds a turn. Turns must come one at a
time: a turn that overlaps another is marked and left out. At exit the stamps go, as JSON, to
the file named by `TRIOPROXY_STAGES_OUT`.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trioproxy.cli as cli
import trioproxy.http_turns as app_module
import trioproxy.proxy as proxy_module
import trioproxy.wsclient as wsclient

# In the order a turn passes them, with what happens between one and the next.
STAGES: list[tuple[str, str]] = [
    ("handler", "hypercorn has the request head; the ASGI app is called"),
    ("body", "the body is read (hypercorn, Quart)"),
    ("parsed", "parsed and validated (orjson)"),
    ("leased", "the session's socket found"),
    ("submitted", "planned (item digests, the upstream message) and handed to the socket's task"),
    ("sending", "the socket's task is running"),
    ("sent", "deflated and sent upstream"),
    ("first_event", "upstream answered; inflated, parsed, handed to the request's task"),
    ("head", "Quart answered; hypercorn wrote the response head"),
    ("chunk", "the first SSE chunk encoded"),
    ("written", "hypercorn wrote it to the client's socket"),
]

_clock = time.perf_counter
_turns: list[dict[str, float]] = []
_current: dict[str, float] = {}


def _mark(stage: str) -> None:
    if stage not in _current:
        _current[stage] = _clock()


def _new_turn() -> None:
    """A request arrived: a turn begins (both are left out if the last one was not answered)."""
    global _current
    overlapped = bool(_current) and "written" not in _current
    if overlapped:
        _current["overlapped"] = 1.0
    _current = {"overlapped": 1.0} if overlapped else {}
    _turns.append(_current)
    _mark("handler")


def _wrap_app(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/responses":
            return await app(scope, receive, send)
        _new_turn()

        async def timed_send(message: dict[str, Any]) -> None:
            body = message["type"] == "http.response.body" and message.get("body")
            if body:
                _mark("chunk")
            await send(message)
            if message["type"] == "http.response.start":
                _mark("head")
            elif body:
                _mark("written")

        await app(scope, receive, timed_send)

    return timed


def install() -> None:
    serve = cli.hypercorn_serve

    async def timed_serve(app: Any, config: Any, **kwargs: Any) -> Any:
        return await serve(_wrap_app(app), config, **kwargs)

    cli.hypercorn_serve = timed_serve

    parse = app_module.parse_request

    def timed_parse(data: bytes) -> Any:
        _mark("body")
        body = parse(data)
        _mark("parsed")
        return body

    app_module.parse_request = timed_parse

    start, first = proxy_module.Proxy._start, proxy_module.Proxy._first

    async def timed_start(self: Any, *args: Any, **kwargs: Any) -> Any:
        _mark("leased")
        return await start(self, *args, **kwargs)

    async def timed_first(self: Any, *args: Any, **kwargs: Any) -> Any:
        _mark("submitted")
        stream = await first(self, *args, **kwargs)
        _mark("first_event")
        return stream

    proxy_module.Proxy._start = timed_start  # type: ignore[method-assign]
    proxy_module.Proxy._first = timed_first  # type: ignore[method-assign]

    send_text = wsclient.ClientSocket.send_text

    async def timed_send_text(self: Any, payload: bytes) -> None:
        _mark("sending")
        await send_text(self, payload)
        _mark("sent")

    wsclient.ClientSocket.send_text = timed_send_text  # type: ignore[method-assign]


def whole(turns: list[dict[str, float]]) -> list[dict[str, float]]:
    """The turns that passed every stage on their own."""
    return [t for t in turns if "overlapped" not in t and all(n in t for n, _ in STAGES)]


def _write() -> None:
    """Every turn in arrival order (the reader knows how many were warm-up)."""
    Path(os.environ["TRIOPROXY_STAGES_OUT"]).write_text(json.dumps(_turns))


if __name__ == "__main__":
    install()
    atexit.register(_write)
    sys.argv[0] = "trioproxy"
    sys.exit(cli.main())
