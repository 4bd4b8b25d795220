"""A client's turn from request to end of stream: socket choice, planning, transparent retry.

This is the layer between the HTTP route and the pool. It picks the socket for a request, plans
the upstream message (suffix or full), and waits for the first event before committing to the
client: until then an upstream refusal that a fresh socket can cure (`previous_response_not_found`,
`websocket_connection_limit_reached`, or a pooled socket that died while idle) is retried once,
on a fresh socket with the full input, and the client never sees it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import orjson
import trio

from trioproxy import bigjson, errors, keys
from trioproxy.codex_auth import CodexAuthError
from trioproxy.config import Settings
from trioproxy.delta import (
    Conversation,
    Sent,
    TurnPlan,
    client_chained,
    digest_input,
    params_digest,
    plan_turn,
)
from trioproxy.errors import ApiError
from trioproxy.events import UpstreamEvent, response_id
from trioproxy.fallback import REFUSALS, FallbackPolicy
from trioproxy.jobs import Sink
from trioproxy.lanepool import Reusable
from trioproxy.lanes import Seat
from trioproxy.managed import Ownership
from trioproxy.registry import Registry
from trioproxy.targets import Target, Upstream, http_url
from trioproxy.telemetry import Carrier, Telemetry
from trioproxy.turn import Turn, TurnEnd
from trioproxy.turnstream import TurnStream, off_loop
from trioproxy.upstream import UpstreamConnection

log = logging.getLogger("trioproxy.proxy")
T = TypeVar("T")

# Events a turn on a shared socket may hold for its client (still bounded by
# `event_buffer_bytes`): deltas are small, so the bytes bound is the one that matters.
SHARED_EVENT_BUFFER = 4096

# Upstream error codes that a fresh socket with the full input cures.
_RETRY_CODES = frozenset({"previous_response_not_found", "websocket_connection_limit_reached"})
# ... and with lanes on, refusals of a lane that another lane or socket cures.
_LANE_CODES = frozenset(
    {
        "websocket_stream_limit_reached",
        "websocket_connection_limit_reached",
        "invalid_stream_id",
        "upstream_ignores_lanes",  # its responses came on the default lane
    }
)


class WebSocketClient(Protocol):
    """A client of ours on a WebSocket (wsturns.py): owns its jobs, hears loose frames."""

    @property
    def sink(self) -> Sink: ...


class Proxy:
    """Runs turns for the HTTP layer; counts what it sent so the savings can be shown."""

    def __init__(
        self, settings: Settings, registry: Registry, telemetry: Telemetry | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.telemetry = telemetry or Telemetry()
        self.ownership = Ownership(strict=settings.refuse_unseen_chains)
        self.fallback = FallbackPolicy(
            settings.fallback_after, settings.fallback_cooldown, enabled=settings.http_fallback
        )
        registry.on_turn.append(self._turn_ended)
        self.turns: Counter[str] = Counter()  # by mode: full / suffix / passthrough / one_turn
        self.placements: Counter[str] = Counter()  # how turns found their socket
        self.retries: Counter[str] = Counter()
        self.request_bytes = 0  # what clients sent: what the upstream would get without us
        self.upstream_bytes = 0
        # Credential groups whose upstream refused a lane name of ours (`invalid_stream_id`):
        # their sessions get sockets of their own.
        # ... until the time stored (the HTTP fallback's cool-down: the upstream may change).
        self._laneless: dict[str, float] = {}

    async def open_turn(
        self,
        body: dict[str, Any],
        headers: list[tuple[str, str]],
        target: Target,
        *,
        request_id: str = "",
        request_bytes: int = 0,
        scope: str | None = None,
        client: str = "http-in",
        beside: UpstreamConnection | None = None,
        owner: WebSocketClient | None = None,
        seatable: bool = True,
    ) -> TurnStream:
        """Start a turn and wait for its first event (or its end); raises `ApiError`.
        `client`: how the request came in, `http-in` or `websocket-in`. `owner`: the
        WebSocket client of ours that sent it (it hears the socket's loose frames while its
        jobs run there, unless the socket is shared). `beside`: a socket that client's other
        responses run on now (its own lanes): the turn goes there too, as another lane of the
        same connection, planned against what that socket holds, if the client's own jobs are
        still pending there. `seatable`: with lanes on, whether the turn may take a seat on a
        shared socket (not when the client's chain lives on a socket of its own)."""
        about: dict[str, Any] = {
            "request_id": request_id,
            "request_bytes": request_bytes,
            "tenant": scope,
            "client": client,
            "channel": target.channel.name if target.channel is not None else None,
        }
        chained = client_chained(body)
        if scope is not None:
            self.check_chain(chained, scope)
        token = await self.token(target)
        upstream = target.upstream(headers, token, scope, body.get("prompt_cache_key"))
        about["owner"] = owner
        if beside is not None and owner is not None and beside.owned_by(owner):
            about["placement"] = "lane"
            stream = await self._start(beside, body, beside.memory, about)
            if stream.first is not None or not self._retryable(stream):
                return stream
            self.retries["lane"] += 1
        if self.fallback.use_http(upstream.group, upstream.key, trio.current_time()):
            return await self._over_http(body, headers, target, upstream, scope, about)
        reusable: Reusable | None = None
        digested = None
        laned = seatable and self._on_lanes(upstream, body)
        if upstream.key is None:
            # No session named: the request's own content says which socket (with lanes on:
            # which seat) continues it.
            digested = await off_loop(request_bytes, digest_input, body)
            key, placement = self.registry.place(
                upstream.group, digested[0], params_digest(body), chained, lanes=laned
            )
            upstream = replace(upstream, key=key)
        else:
            placement = "cache_key" if upstream.session == "cache_key" else "header"
            reusable = _continuing(chained)
        if laned:
            try:
                return await self._laned(
                    body, headers, target, upstream, scope, about, reusable, placement, digested
                )
            except ApiError as exc:
                return await self._not_leased(exc, body, headers, target, upstream, scope, about)
        return await self._pooled(
            body, headers, target, upstream, scope, about, reusable, placement, digested
        )

    async def _pooled(
        self,
        body: dict[str, Any],
        headers: list[tuple[str, str]],
        target: Target,
        upstream: Upstream,
        scope: str | None,
        about: dict[str, Any],
        reusable: Reusable | None,
        placement: str,
        digested: tuple[bytes, Sent] | None = None,
    ) -> TurnStream:
        """A session's turn on a socket of its own: its pooled one, or a fresh one. A refusal
        a fresh socket cures is retried once, with the full input, unseen by the client."""
        try:
            conn, upstream = await self._lease(target, upstream, headers, reusable, scope)
        except ApiError as exc:
            return await self._not_leased(exc, body, headers, target, upstream, scope, about)
        about["placement"] = "new" if conn.turns == 0 else placement
        stream = await self._start(conn, body, conn.memory, about, digested)
        if stream.first is not None:
            return stream
        end = stream.end
        if self._http_cures(end):
            return await self._over_http(body, headers, target, upstream, scope, about)
        if _unauthorized(end) and upstream.token is not None:
            # A pooled socket whose token lapsed upstream: refresh, then a fresh socket.
            cause: str | None = "unauthorized"
            upstream = await self._refreshed(target, upstream, headers, scope)
        elif self._retryable(stream):
            cause = end.error.code if end.kind == "error" and end.error else end.kind
        else:
            return stream
        # Once, on a new socket (pooled again if the failed one was), with the full input.
        self.retries[cause or end.kind] += 1
        log.info("turn refused before its first event (%s); retrying on a fresh socket", cause)
        if self.fallback.use_http(upstream.group, upstream.key, trio.current_time()):
            return await self._over_http(body, headers, target, upstream, scope, about)
        retry_key = None if conn.one_turn else upstream.key
        conn = await self.registry.lease(
            retry_key, upstream.url, upstream.headers, fresh=True, group=conn.group
        )
        about["placement"] = "new"
        return await self._start(conn, body, None, about, digested)

    async def _not_leased(
        self,
        exc: ApiError,
        body: dict[str, Any],
        headers: list[tuple[str, str]],
        target: Target,
        upstream: Upstream,
        scope: str | None,
        about: dict[str, Any],
    ) -> TurnStream:
        """No socket could be had: over HTTP if the upstream refuses WebSocket, else `exc`."""
        if self.fallback.enabled and exc.status in REFUSALS:
            # The upstream does not take WebSocket here: HTTP for a while, starting now.
            self.fallback.websocket_refused(upstream.group, trio.current_time())
            self.retries["websocket_refused"] += 1
            log.info("upstream refused the WebSocket upgrade (%d): HTTP for now", exc.status)
            return await self._over_http(body, headers, target, upstream, scope, about)
        if exc.code == "upstream_unreachable":
            self.fallback.socket_failed(upstream.key, trio.current_time())
        raise exc

    def _on_lanes(self, upstream: Upstream, body: dict[str, Any]) -> bool:
        """Whether a turn takes a seat on a shared socket: lanes on, and not on a lane a
        WebSocket client named itself (those run on a socket whose lanes are its own; wsturns
        already passes them as not `seatable`, and HTTP bodies may name none: a backstop)."""
        if not self.settings.lanes or body.get("stream_id") is not None:
            return False
        until = self._laneless.get(upstream.group)
        if until is not None and trio.current_time() >= until:
            del self._laneless[upstream.group]  # time to try lanes again
            until = None
        return until is None

    async def _laned(
        self,
        body: dict[str, Any],
        headers: list[tuple[str, str]],
        target: Target,
        upstream: Upstream,
        scope: str | None,
        about: dict[str, Any],
        reusable: Reusable | None,
        placement: str,
        digested: tuple[bytes, Sent] | None = None,
    ) -> TurnStream:
        """A session's turn with lanes on: on its seat, as a fork beside it while it is
        busy, or (busy, no lane free) on a socket of its own. A refusal another lane or socket
        cures is retried once, with the full input, unseen by the client."""
        seat, upstream = await self._seat(target, upstream, headers, scope, reusable=reusable)
        about["placement"] = "fork" if seat.fork else "new" if seat.fresh else placement
        memory = seat.memory
        if seat.fork and body.get("store") is False:
            # With store=false the connection keeps a lane's latest response only, and the
            # session's lane has moved past the fork's parent already: the fork goes with its
            # full input on its own lane (still no new socket) instead of a refused suffix.
            memory = None
        stream = await self._start(seat.conn, body, memory, about, digested, seat=seat)
        if stream.first is not None:
            return stream
        end = stream.end
        if self._http_cures(end):
            return await self._over_http(body, headers, target, upstream, scope, about)
        code = end.error.code if end.error is not None else None
        avoid: UpstreamConnection | None = seat.conn
        if _unauthorized(end) and upstream.token is not None:
            self.registry.lanes.drop(seat.conn, "unauthorized")  # its token lapsed for all
            upstream = await self._refreshed(target, upstream, headers, scope)
            cause = "unauthorized"
        elif code in _LANE_CODES and end.kind in ("error", "socket"):
            self.registry.lanes.refused(seat, code)
            cause = code or ""
        elif self._retryable(stream):
            cause = (code if end.kind == "error" else None) or end.kind
            if code == "previous_response_not_found":
                avoid = None  # the socket is sound; only the chain is gone
        else:
            return stream
        self.retries[cause] += 1
        log.info("lane turn refused before its first event (%s); retrying", cause)
        if self.fallback.use_http(upstream.group, upstream.key, trio.current_time()):
            return await self._over_http(body, headers, target, upstream, scope, about)
        if code in ("invalid_stream_id", "upstream_ignores_lanes") and seat.lane is not None:
            # The upstream takes no lane names of ours: this group's sessions get sockets of
            # their own for the fallback's cool-down, then lanes are tried again.
            cooldown = max(self.settings.fallback_cooldown, 1.0)
            self._laneless[upstream.group] = trio.current_time() + cooldown
            conn, upstream = await self._lease(target, upstream, headers, None, scope)
            about["placement"] = "new" if conn.turns == 0 else placement
            return await self._start(conn, body, conn.memory, about, digested)
        # A refused fork leaves the session's own seat as it was; anything else starts afresh.
        fresh = not seat.fork
        seat, upstream = await self._seat(
            target, upstream, headers, scope, fresh=fresh, avoid=avoid
        )
        about["placement"] = "fork" if seat.fork else "new"
        return await self._start(seat.conn, body, None, about, digested, seat=seat)

    async def _seat(
        self,
        target: Target,
        upstream: Upstream,
        headers: list[tuple[str, str]],
        scope: str | None,
        *,
        reusable: Reusable | None = None,
        fresh: bool = False,
        avoid: UpstreamConnection | None = None,
    ) -> tuple[Seat, Upstream]:
        """The session's seat; a held login refused at the handshake is refreshed, then
        retried. The shared socket's handshake carries no session's own headers."""
        key = upstream.key
        assert key is not None

        async def take(up: Upstream, renewed: bool) -> Seat:
            return await self.registry.seat(
                key,
                up.group,
                up.url,
                keys.shared(up.headers),
                reusable=reusable,
                fresh=fresh or renewed,
                avoid=avoid,
                unnamed=up.session is None,
            )

        return await self._authorized(target, upstream, headers, scope, take)

    async def hold_socket(
        self,
        headers: list[tuple[str, str]],
        target: Target,
        scope: str | None,
        owner: WebSocketClient,
    ) -> UpstreamConnection:
        """The session's upstream socket, leased with no turn (a WebSocket client relays an
        event this proxy does not know): held until `Registry.release`, its loose frames
        going to `owner`."""
        token = await self.token(target)
        upstream = target.upstream(headers, token, scope)
        conn, _ = await self._lease(target, upstream, headers, None, scope)
        conn.hold(owner)
        conn.attach(owner.sink)
        return conn

    def check_chain(self, chained: str | None, scope: str) -> None:
        """Refuse a `previous_response_id` another scope made, on every route that carries
        one (turns, compaction): as not found, so its existence is not revealed either."""
        if chained is not None and self.ownership.foreign(chained, scope):
            raise errors.previous_response_not_found(chained)

    async def _over_http(
        self,
        body: dict[str, Any],
        headers: list[tuple[str, str]],
        target: Target,
        upstream: Upstream,
        scope: str | None,
        about: dict[str, Any],
    ) -> TurnStream:
        """The turn as one `POST {base}/responses` streamed back as SSE, full input."""
        plan = plan_turn(None, body)
        payload = orjson.dumps({**body, "stream": True})
        about = {**about, "placement": "http"}
        turn = Turn(
            plan,
            self.settings.event_buffer,
            transport="http",
            payload=payload,
            buffer_bytes=self.settings.event_buffer_bytes,
            **about,
        )
        self.turns[plan.mode] += 1
        self.upstream_bytes += turn.sent_bytes
        url = http_url(upstream.url, "/responses")
        http_headers = target.http_headers(headers, upstream.token, scope)
        submitted = trio.current_time()
        await self.registry.run_http(turn, url, http_headers, upstream.key)
        return await self._first(turn, submitted)

    def _http_cures(self, end: TurnEnd) -> bool:
        """Whether a turn refused before its first event goes once over HTTP instead: the
        upstream closed its socket with 1009 on this turn's message, so no socket takes it (and
        a retry on a shared one would end its other lanes too), while an HTTP POST has no
        message limit. With the HTTP fallback off the client hears 413
        `upstream_message_too_large`."""
        if not (_too_large(end) and self.fallback.enabled):
            return False
        self.retries["too_large"] += 1
        log.info("turn's message too large for a WebSocket message upstream; sent over HTTP")
        return True

    async def token(self, target: Target) -> str | None:
        """The held login's access token (refreshed if due), or None for pass-through."""
        if target.login is None:
            return None
        try:
            return await target.login.access_token()
        except CodexAuthError as exc:
            raise errors.login_failed(str(exc)) from None

    async def _lease(
        self,
        target: Target,
        upstream: Upstream,
        headers: list[tuple[str, str]],
        reusable: Reusable | None,
        scope: str | None,
    ) -> tuple[UpstreamConnection, Upstream]:
        """A socket for the turn; a held login refused with 401 is refreshed, then retried."""
        group = upstream.group if upstream.session is None else None

        async def take(up: Upstream, renewed: bool) -> UpstreamConnection:
            return await self.registry.lease(
                up.key, up.url, up.headers, reusable=reusable, fresh=renewed, group=group
            )

        return await self._authorized(target, upstream, headers, scope, take)

    async def _authorized(
        self,
        target: Target,
        upstream: Upstream,
        headers: list[tuple[str, str]],
        scope: str | None,
        take: Callable[[Upstream, bool], Awaitable[T]],
    ) -> tuple[T, Upstream]:
        """`take(upstream, renewed)`; when a held login's token is refused at the handshake
        (401), the token is refreshed and `take` runs once more, renewed (a fresh socket)."""
        try:
            return await take(upstream, False), upstream
        except ApiError as exc:
            if exc.status != 401 or upstream.token is None:
                raise
        self.retries["unauthorized"] += 1
        upstream = await self._refreshed(target, upstream, headers, scope)
        return await take(upstream, True), upstream

    async def _refreshed(
        self,
        target: Target,
        upstream: Upstream,
        headers: list[tuple[str, str]],
        scope: str | None,
    ) -> Upstream:
        """The upstream refused the held token: the same upstream with a newer one."""
        assert target.login is not None and upstream.token is not None
        log.info("upstream refused the held ChatGPT token; refreshing it as Codex does")
        try:
            token = await target.login.unauthorized(upstream.token)
        except CodexAuthError as exc:
            raise errors.login_failed(str(exc)) from None
        # The pool key names the account, not the token: the session keeps its key.
        renewed = target.upstream(headers, token, scope)
        return replace(upstream, headers=renewed.headers, token=token)

    def _turn_ended(self, carrier: Carrier, turn: Turn, end: TurnEnd) -> None:
        """Who owns the response (managed scopes), and how this session's sockets fare."""
        if turn.tenant is not None:
            # Every response the client saw begin is its scope's to chain from: the final
            # one, a steered one before it, one cut short.
            rid = response_id(end.event) if end.event is not None else None
            begun = end.begun.get("id") if end.begun is not None else None
            for made in (*turn.tracker.earlier, begun, rid):
                if isinstance(made, str):
                    self.ownership.record(made, turn.tenant)
        if turn.transport != "websocket":
            return
        if turn.seat is not None and turn.seat.lane is not None:
            # A shared socket (lanes): each session seated on it counts its own failures (a
            # fork's lane is no session's); a client that read too slowly is no failure of
            # the socket's.
            key = turn.seat.key
            slow = end.error is not None and end.error.code == "client_too_slow"
            if key is None:
                return
            if end.kind in ("socket", "timeout") and not slow:
                self.fallback.socket_failed(key, trio.current_time())
            elif end.kind == "completed":
                self.fallback.socket_ok(key)
            return
        if end.kind in ("socket", "timeout"):
            # Once per socket: the lanes a drop ends are one failure, not one each.
            if not getattr(carrier, "failure_counted", False):
                self.fallback.socket_failed(carrier.key, trio.current_time())
            if isinstance(carrier, UpstreamConnection):
                carrier.failure_counted = True
        elif end.kind == "completed":
            self.fallback.socket_ok(carrier.key)

    def _retryable(self, stream: TurnStream) -> bool:
        end = stream.end
        if end.kind == "socket":
            # Nothing reached the client; a fresh socket gets a clean start, unless the
            # upstream said the message itself is too large for it.
            return end.error is None or end.error.code != "upstream_message_too_large"
        if end.kind == "error" and end.error is not None and end.error.code in _RETRY_CODES:
            # A chain the client built itself cannot be rebuilt by the proxy.
            return not (
                end.error.code == "previous_response_not_found"
                and stream.turn.plan.mode == "passthrough"
            )
        return False

    async def _start(
        self,
        conn: UpstreamConnection,
        body: dict[str, Any],
        memory: Conversation | None,
        about: dict[str, Any],
        digested: tuple[bytes, Sent] | None = None,
        *,
        seat: Seat | None = None,
    ) -> TurnStream:
        lane = seat.lane if seat is not None else None
        try:
            plan, payload = await off_loop(
                about["request_bytes"], _planned, memory, body, digested, lane
            )
        except BaseException:
            # Leased for a turn that never reached it (the client left while a large request
            # was planned): the socket is unchanged, so it goes back to the pool. A socket the
            # turn only joined (a lane beside the client's others) is not this turn's to give.
            self._give_back(conn, seat, about)
            raise
        shared = seat is not None and seat.lane is not None
        turn = Turn(
            plan,
            # On a shared socket a turn is never waited for (one slow client would stall every
            # lane): it buffers up to its bytes bound, then ends (`client_too_slow`).
            max(self.settings.event_buffer, SHARED_EVENT_BUFFER)
            if shared
            else self.settings.event_buffer,
            payload=payload,
            buffer_bytes=self.settings.event_buffer_bytes,
            **about,
        )
        turn.response_headers = conn.response_headers
        turn.seat = seat
        owner: WebSocketClient | None = about.get("owner")
        submitted = trio.current_time()
        self.turns["one_turn" if conn.one_turn else plan.mode] += 1
        self.placements[about["placement"]] += 1
        self.upstream_bytes += turn.sent_bytes
        joining = owner if about["placement"] == "lane" else None
        if not conn.submit(turn, joining=joining):
            self._give_back(conn, seat, about)
            turn.finish(TurnEnd("socket", error=errors.upstream_closed("socket task ended")))
            return TurnStream(turn, None)
        if owner is not None and not shared:
            # A shared socket's loose frames are no one client's: its default lane belongs
            # to none of the sessions seated there.
            conn.attach(owner.sink)
        return await self._first(turn, submitted, conn)

    def _give_back(
        self, conn: UpstreamConnection, seat: Seat | None, about: dict[str, Any]
    ) -> None:
        if seat is not None and seat.lane is not None:
            self.registry.lanes.give_back(seat)
        elif about["placement"] != "lane":
            self.registry.give_back(conn)

    async def _first(
        self, turn: Turn, submitted: float, conn: UpstreamConnection | None = None
    ) -> TurnStream:
        """Wait for the turn's first event (or its end) before answering the client."""
        try:
            first: UpstreamEvent | None = await turn.receive()
            turn.first_event_at = trio.current_time()
            self.telemetry.first_event.observe(turn.first_event_at - submitted)
        except trio.EndOfChannel:
            first = None
        except BaseException:
            turn.abandon()  # cancelled while waiting: the upstream's state is unknown
            raise
        return TurnStream(turn, first, conn)


def _planned(
    memory: Conversation | None,
    body: dict[str, Any],
    digested: tuple[bytes, Sent] | None,
    lane: str | None = None,
) -> tuple[TurnPlan, bytes]:
    """The turn's plan and the frame it sends (both proportional to the input's size), on
    the proxy's lane `lane` when the socket is shared."""
    plan = plan_turn(memory, body, digested)
    if lane is not None:
        plan.message["stream_id"] = lane
    return plan, bigjson.dumps_message(plan.message)


def _continuing(chained: str | None) -> Reusable | None:
    """For a turn that chains from `chained`: whether a session's socket (or seat) holds it,
    as its last response or one it finished recently (another lane's, a steered turn's
    successor). An id it never made goes to a fresh socket: refused on the session's, it
    would evict that socket and its chain."""
    if chained is None:
        return None

    def reusable(memory: Conversation | None, answered: Collection[str]) -> bool:
        return (memory is not None and memory.response_id == chained) or chained in answered

    return reusable


def _too_large(end: TurnEnd) -> bool:
    return end.error is not None and end.error.code == "upstream_message_too_large"


def _unauthorized(end: TurnEnd) -> bool:
    return end.kind == "error" and end.error is not None and end.error.status == 401
