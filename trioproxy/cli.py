"""`trioproxy serve` and `trioproxy fake-upstream`."""

from __future__ import annotations

import argparse
import gc
import getpass
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from trioproxy import endpoint, logs, managed
from trioproxy.codex_auth import CodexAuthError, CodexLogin, default_path
from trioproxy.config import Settings, redacted_url
from trioproxy.managed import Managed
from trioproxy.proxy import Proxy
from trioproxy.registry import Registry

log = logging.getLogger("trioproxy")


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            return


async def _drained(registry: Registry, grace: float) -> None:
    """hypercorn's shutdown trigger: on a signal, refuse new turns with 503 and give the running
    ones `grace` seconds to finish; then hypercorn stops and every socket is closed."""
    await _until_signalled()
    registry.draining = True
    with trio.move_on_after(grace):
        await registry.wait_quiet()
    cut = registry.kill_busy()
    log.info("drained (%d turns cut at the end of the grace); closing every upstream socket", cut)
    await registry.aclose(grace=registry.close_timeout)


class ServerConfig(Config):
    """hypercorn's config, with a write timeout on the listening sockets.

    hypercorn has none: a client that stops reading (its window closed, the process stopped)
    keeps a connection and its hypercorn task forever, the write shielded. The kernel's
    TCP_USER_TIMEOUT, inherited by every accepted socket, aborts a connection whose data
    stays unacknowledged (zero-window probes included) for that long.
    """

    write_timeout: float = 0.0  # seconds; 0: the kernel's default (about 15 minutes)

    def _create_sockets(
        self, binds: list[str], type_: int = socket.SOCK_STREAM
    ) -> list[socket.socket]:
        sockets: list[socket.socket] = super()._create_sockets(binds, type_)
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if type_ == socket.SOCK_STREAM and self.write_timeout > 0 and option is not None:
            for sock in sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, option, int(self.write_timeout * 1000))
        return sockets


def hypercorn_config(
    host: str,
    port: int,
    write_timeout: float = 0.0,
    max_message: int = 32 * 1024 * 1024,
    keep_alive: float = 75.0,
) -> ServerConfig:
    config = ServerConfig()
    config.write_timeout = write_timeout
    # Longer than a balancer's own idle keep-alive to us (nginx, HAProxy: docs/deploy.md), so
    # the balancer is the side that closes an idle connection, never mid-reuse.
    config.keep_alive_timeout = keep_alive
    # Client WebSockets: pinged so a dead peer is noticed between turns; a message larger
    # than a request body may be is closed with 1009 (hypercorn offers them permessage-deflate).
    config.websocket_ping_interval = 20.0
    config.websocket_max_message_size = max_message
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through our formatter, not its own
    # After the drain (`_drained`: running turns finished or cut) only connections are left to
    # close; hypercorn's ping task of a client WebSocket, even one long closed, would otherwise
    # hold the exit for the whole timeout.
    config.graceful_timeout = 2.0
    # hypercorn's default listen backlog is 100: 256 clients connecting at once overflowed it
    # and some had their connection reset mid-request (the bench's 256-session row).
    config.backlog = 4096
    return config


async def run_server(settings: Settings, keys: Managed | None = None) -> None:
    from trioproxy.app import create_app

    app = create_app(settings, managed=keys)
    proxy: Proxy = app.extensions["trioproxy"]
    config = hypercorn_config(
        settings.host,
        settings.port,
        settings.write_timeout,
        settings.max_body_bytes,
        settings.keep_alive_timeout,
    )
    # The channels' upstreams in managed mode (--upstream is unused there); never an
    # `?api-key=` or userinfo in the log.
    if keys is not None:
        shown = ", ".join(f"{n}={redacted_url(c.upstream)}" for n, c in keys.channels.items())
    else:
        shown = redacted_url(settings.chatgpt_ws if settings.codex_auth else settings.upstream_ws)
    log.info("trioproxy on http://%s:%d/v1 -> %s", settings.host, settings.port, shown)
    if settings.codex_auth:
        log.info("using the ChatGPT login in %s for /v1/responses", settings.codex_auth)
    trigger = partial(_drained, proxy.registry, settings.shutdown_grace)
    tune_gc(settings.gc_gen0)
    await hypercorn_serve(app, config, shutdown_trigger=trigger)


def tune_gc(gen0: int) -> None:
    """Freeze what start-up built (modules, the app: never garbage, no longer scanned by every
    old-generation pass) and collect the young generation every `gen0` allocations (see
    `Settings.gc_gen0`; 0 leaves Python's defaults)."""
    if gen0 <= 0:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(gen0, older, oldest)


async def run_fake(host: str, port: int, event_delay: float, reencrypt: bool = True) -> None:
    from trioproxy.fake import FakeUpstream

    fake = FakeUpstream(event_delay=event_delay, keep_messages=False)
    fake.reencrypt = reencrypt
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve, host, port)
        print(f"fake upstream listening on {fake.url}", flush=True)
        await _until_signalled()
        nursery.cancel_scope.cancel()


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _level(value: str) -> str:
    if value.upper() not in _LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(_LEVELS)}")
    return value.upper()


def _log_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The log flags, accepted before or after the command (`trioproxy serve --log-format
    text` as the README shows it); after the command they win."""
    level: Any = os.environ.get("TRIOPROXY_LOG_LEVEL", "INFO") if top else argparse.SUPPRESS
    fmt: Any = os.environ.get("TRIOPROXY_LOG_FORMAT", "json") if top else argparse.SUPPRESS
    parser.add_argument(
        "--log-level",
        type=_level,
        default=level,
        help=f"one of {', '.join(_LEVELS)} (default INFO; TRIOPROXY_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=["json", "text"],
        default=fmt,
        help="one JSON object per line (default), or text for a terminal (TRIOPROXY_LOG_FORMAT)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioproxy",
        description="An OpenAI Responses API proxy that keeps one upstream WebSocket per "
        "session. Commands: serve, hash-key, fake-upstream.",
    )
    _log_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy (settings also from TRIOPROXY_* variables)")
    _log_options(serve, top=False)
    serve.add_argument(
        "--config",
        default=os.environ.get("TRIOPROXY_CONFIG"),
        help="TOML config: [server] settings, managed [keys.*] and [channels.*]",
    )
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8787)")
    serve.add_argument(
        "--upstream",
        help="upstream Responses WebSocket URL, or its https:// API base "
        "(default wss://api.openai.com/v1/responses)",
    )
    serve.add_argument("--idle-ttl", type=float, help="seconds an idle socket is kept (3000)")
    serve.add_argument("--max-lifetime", type=float, help="max socket age in seconds (3000)")
    serve.add_argument("--turn-timeout", type=float, help="max seconds for one turn (600)")
    serve.add_argument("--connect-timeout", type=float, help="handshake timeout in seconds (15)")
    serve.add_argument(
        "--read-timeout", type=float, help="max upstream silence within a turn, seconds (240)"
    )
    serve.add_argument("--max-sockets", type=int, help="cap on pooled sockets (10000)")
    serve.add_argument(
        "--permessage-deflate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offer permessage-deflate on upstream sockets (default on)",
    )
    serve.add_argument(
        "--lanes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put sessions on named lanes of shared upstream sockets (default off)",
    )
    serve.add_argument(
        "--chatgpt-upstream",
        help="Codex backend WebSocket URL (wss://chatgpt.com/backend-api/codex/responses)",
    )
    serve.add_argument(
        "--codex-auth",
        nargs="?",
        const=str(default_path()),
        metavar="PATH",
        help="serve /v1/responses with the ChatGPT login in this Codex auth.json "
        "(default ~/.codex/auth.json), refreshing it as Codex does",
    )
    serve.add_argument(
        "--api-key",
        help="key clients must send (Authorization: Bearer) to use --codex-auth; "
        "required unless listening on loopback (also TRIOPROXY_API_KEY)",
    )
    serve.add_argument("--codex-token-url", help="OAuth token endpoint for refreshes")

    check = sub.add_parser(
        "check",
        parents=[serve],
        add_help=False,
        help="read the configuration as serve would and try each upstream's handshake once",
    )
    check.set_defaults(command="check")

    hasher = sub.add_parser("hash-key", help="print the sha256 a [keys.NAME] entry stores")
    hasher.add_argument("key", nargs="?", help="the proxy key (default: asked for, or stdin)")

    fake = sub.add_parser("fake-upstream", help="run the bundled fake Responses WebSocket upstream")
    _log_options(fake, top=False)
    fake.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    fake.add_argument("--port", type=int, default=8765, help="listen port (default 8765; 0: any)")
    fake.add_argument("--event-delay", type=float, default=0.0, help="seconds between events")
    fake.add_argument(
        "--no-reencrypt",
        dest="reencrypt",
        action="store_false",
        help="send a reasoning item's ciphertext the same in output_item.done and "
        "response.completed (the live API re-encrypts it in between; default: as live)",
    )
    return parser


def _read_key() -> str:
    """The key to hash: asked for without echo on a terminal, else one line of stdin."""
    if sys.stdin.isatty():
        return getpass.getpass("proxy key: ").strip()
    return sys.stdin.readline().strip()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    if args.command == "fake-upstream":
        trio.run(run_fake, args.host, args.port, args.event_delay, args.reencrypt)
        return 0
    if args.command == "hash-key":
        key = args.key if args.key is not None else _read_key()
        if not key:
            print("trioproxy: no key given (an empty key would match nothing)", file=sys.stderr)
            return 2
        print(managed.hash_key(key))
        return 0
    try:
        server, keys = managed.load(args.config)
        settings = Settings.from_env(base=server).with_overrides(
            host=args.host,
            port=args.port,
            upstream=args.upstream,
            idle_ttl=args.idle_ttl,
            max_lifetime=args.max_lifetime,
            turn_timeout=args.turn_timeout,
            connect_timeout=args.connect_timeout,
            read_timeout=args.read_timeout,
            max_sockets=args.max_sockets,
            permessage_deflate=args.permessage_deflate,
            lanes=args.lanes,
            chatgpt_upstream=args.chatgpt_upstream,
            codex_auth=args.codex_auth,
            api_key=args.api_key,
            codex_token_url=args.codex_token_url,
        )
        if settings.codex_auth:
            if keys is not None:
                raise ValueError("managed keys and --codex-auth cannot be combined")
            CodexLogin(Path(settings.codex_auth).expanduser(), "")  # refuse a bad file now
        endpoint.check_environment()
    except (ValueError, CodexAuthError, endpoint.ProxyError) as exc:
        print(f"trioproxy: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        from trioproxy import check

        print(f"configuration: ok ({'managed keys' if keys else 'pass-through'})")
        return check.main(settings, keys)
    try:
        trio.run(run_server, settings, keys)
    except (OSError, BaseExceptionGroup) as exc:
        # The port is taken, the address is not this machine's: hypercorn raises it from
        # inside its nurseries, a traceback of dozens of lines for a one-line problem.
        cause = _os_error(exc)
        if cause is None:
            raise
        where = f"{settings.host}:{settings.port}"
        print(f"trioproxy: cannot listen on {where}: {cause.strerror or cause}", file=sys.stderr)
        return 2
    return 0


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError at the bottom of `exc` (a group of one, however deep), if that is all."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None


if __name__ == "__main__":
    sys.exit(main())
