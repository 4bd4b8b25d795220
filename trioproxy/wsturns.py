"""WebSocket turns: clients that speak the Responses WebSocket protocol themselves.

Codex with `supports_websockets = true` and the `openai` SDK's `client.responses.connect()`
open `ws(s)://{base_url}/responses` and send `response.create` messages. Each one becomes a turn
exactly like an HTTP request's: the same authentication, scopes, session keying and planning
(a full resend on a socket that holds the conversation goes as a suffix, a client's own
`previous_response_id` passes through), run on the session's pooled upstream socket by the task
that owns it. The events go back as text frames, byte for byte.

The client's socket is not the upstream's: when it closes between turns the upstream socket stays
pooled under its session, so a client that reconnects with the same session (or chains from its
last id without one) continues its `previous_response_id` chain. A client socket closed
mid-response cancels that response and evicts its upstream socket, as HTTP does.

Lanes (`stream_id`): each lane's messages run in order, one at a time; different lanes run at
once, as lanes of the same upstream socket (so one lane can fork from another's response), and
their events interleave on the client's socket. `response.steer` goes to the socket its target
runs on; that turn then stays open until the steering is settled (a successor response that
commits it, or its failure). Events this proxy does not know are relayed on the session's socket
and the upstream's answers come back as they came.

With lanes on (lanes.py), the client's default lane takes its session's seat on a shared socket,
as an HTTP client's turns do. The lanes it names itself, and everything after an event this proxy
does not know, run on a socket of its own: neither may reach the other sessions of a shared one.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from typing import Any

import orjson
import trio
from quart import Response, websocket
from quart_trio import QuartTrio

from trioproxy import access, bigjson, errors, keys
from trioproxy.answers import error_response
from trioproxy.awaiting import steer_failure
from trioproxy.context import AppContext
from trioproxy.errors import ApiError
from trioproxy.events import UpstreamEvent
from trioproxy.jobs import Notice
from trioproxy.proxy import Proxy
from trioproxy.targets import Target
from trioproxy.telemetry import request_id
from trioproxy.turn import Turn
from trioproxy.turnstream import TurnStream, off_loop
from trioproxy.upstream import UpstreamConnection
from trioproxy.validate import check_body, check_headers, require_unstored

log = logging.getLogger("trioproxy.wsturns")

# Close codes (RFC 6455): refused credentials or a client past its limits; a proxy fault.
CLOSE_POLICY = 1008
CLOSE_FAULT = 1011
# Messages a client may send ahead of its running turns (Codex and the SDK send none), and
# its lanes running at once (the protocol's own limit of active responses per connection).
_QUEUED = 16
_RUNNING = 16
# Loose frames (see `Loose`) a client may leave unread.
_LOOSE = 64
# Frames on their way to the client: with each turn's own bounded buffer, all a client that
# stops reading can make the proxy hold before the upstream's reading stops.
_OUTBOX = 16
_STEER_FIELDS = ("type", "previous_response_id", "input")
# The protocol's lane names (openai `lib/responses_websocket/README.md`).
_STREAM_ID = re.compile(r"[A-Za-z0-9_.\-]{1,256}")


def error_frame(error: ApiError, stream_id: str | None = None) -> str:
    """The nested `error` event the WebSocket protocol uses (echoing a lane's `stream_id`)."""
    event: dict[str, Any] = {"type": "error", "status": error.status, **error.body()}
    if stream_id is not None:
        event["stream_id"] = stream_id
    return orjson.dumps(event).decode()


def steer_failed(message: dict[str, Any], code: str, text: str) -> str:
    """`response.steer.failed` for steering the proxy cannot deliver: the input comes back
    so the client can carry it into its next `response.create`."""
    error = {"code": code, "message": text, "type": "invalid_request_error"}
    return orjson.dumps(steer_failure(message, error)).decode()


async def serve(proxy: Proxy, gate: access.Gate, route: access.Route) -> None:
    """One client WebSocket, from its upgrade to its close."""
    headers = keys.normalise(websocket.headers.items())
    try:
        target, scope = gate.resolve(headers, route)
        check_headers(headers)
    except ApiError as exc:
        await websocket.accept()
        await websocket.send(error_frame(exc))
        await websocket.close(CLOSE_POLICY if exc.status in (401, 403) else 1000, exc.code or "")
        return
    await websocket.accept()
    proxy.telemetry.websocket_clients += 1
    try:
        await ClientSession(proxy, target, scope, headers).run()
    except Exception:
        log.exception("WebSocket client session failed")
        proxy.telemetry.clients_closed["proxy fault"] += 1
        await websocket.close(CLOSE_FAULT, "proxy fault")
    finally:
        proxy.telemetry.websocket_clients -= 1


class Loose:
    """The upstream's frames that belong to no running turn of a client (steering answers
    for a finished response, answers to relayed events, connection-level errors), on their
    way to it. The socket's task hands them over without waiting: a client that leaves
    `_LOOSE` of them unread is closed (1008) rather than stalling the socket."""

    def __init__(self, overflow: trio.CancelScope) -> None:
        self._send, self.frames = trio.open_memory_channel[UpstreamEvent](_LOOSE)
        self._overflow = overflow
        self.overflowed = False

    def offer(self, event: UpstreamEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.overflowed = True
            self._overflow.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client has gone

    def close(self) -> None:
        self._send.close()
        self.frames.close()


class ClientSession:
    """One client socket: its lanes, the upstream socket its responses run on, its outbox.

    Tasks: the reader (this one), a writer that owns sending to the client, one task per
    busy lane (at most `_RUNNING` run at once), and one for the loose frames. The client owns
    its jobs on its own upstream socket: it joins that socket with another lane, steers or
    relays only while its own jobs are pending there (the pool cannot have lent it to anyone
    else). A shared socket (its seat's, lanes on) is lent to other sessions by design: there it
    only steers its own running responses, and never joins or relays.
    """

    def __init__(
        self, proxy: Proxy, target: Target, scope: str | None, headers: list[tuple[str, str]]
    ) -> None:
        self.proxy = proxy
        self.target = target
        self.scope = scope
        self.headers = headers
        self.outbox, self._outbox_recv = trio.open_memory_channel[str](_OUTBOX)
        self._cancel = trio.CancelScope()
        self.sink = Loose(self._cancel)
        self.waiting: dict[str | None, deque[dict[str, Any]]] = {}
        self.waiting_bytes = 0
        self.waiting_count = 0  # messages not started yet
        self.conn: UpstreamConnection | None = None  # its own socket: where its lanes run now
        # Where its default lane's last response ran: a shared socket (lanes on, a seat of its
        # session's) or its own. A chain is the socket's, so the default lane stays there.
        self.default_conn: UpstreamConnection | None = None
        # It named a lane of its own: from then on its default lane runs beside its lanes, on
        # its own socket, so a chain may cross between them as on a direct connection.
        self.named_lanes = False
        self.held: UpstreamConnection | None = None  # leased to relay an event
        # Its turns in progress, and the socket each runs on (None over HTTP).
        self.mine: dict[Turn, UpstreamConnection | None] = {}
        # Events it relayed whose answers may still come on the default lane.
        self.relayed: list[Notice] = []
        self._running = trio.Semaphore(_RUNNING)
        self._placing: trio.Event | None = None  # a turn is finding its socket
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._write)
                    nursery.start_soon(self._loose)
                    await self._read()
                    nursery.cancel_scope.cancel()
        finally:
            self._let_go()
            self.sink.close()
        if self.sink.overflowed:
            await self._close(CLOSE_POLICY, "too many unread events")

    async def _write(self) -> None:
        """The one task that sends to the client: frames of every lane, in arrival order."""
        async for frame in self._outbox_recv:
            await websocket.send(frame)

    async def _loose(self) -> None:
        async for event in self.sink.frames:
            await self.outbox.send(event.raw)

    async def _read(self) -> None:
        idle = self.proxy.settings.websocket_idle_timeout
        while True:
            raw: str | bytes | None = None
            with trio.move_on_after(idle):
                raw = await websocket.receive()
            if raw is None:
                if self._active():
                    continue  # only a client with nothing running is idle
                await self._close(1000, "idle")
                return
            data = raw.encode() if isinstance(raw, str) else raw
            if not await self._message(data):
                return

    async def _close(self, code: int, reason: str) -> None:
        """Close the client, counted by reason: an operator sees clients cut for a bound."""
        self.proxy.telemetry.clients_closed[reason] += 1
        await websocket.close(code, reason)

    def _active(self) -> bool:
        return bool(self.waiting or any(turn.end is None for turn in self.mine))

    async def _message(self, data: bytes) -> bool:
        """Dispatch one client message; False once the client has been closed."""
        try:
            message = await off_loop(len(data), parse_request_event, data)
        except ApiError as exc:
            await self.outbox.send(error_frame(exc))
            return True
        kind = message.get("type")
        if kind == "response.create":
            return await self._create(message, len(data))
        if kind == "response.steer":
            await self._steer(message)
            return True
        return await self._relay_unknown(message)

    async def _create(self, message: dict[str, Any], size: int) -> bool:
        lane = message.get("stream_id")
        if lane is not None and not (isinstance(lane, str) and _STREAM_ID.fullmatch(lane)):
            refused = ApiError(
                400,
                "`stream_id` must be 1-256 ASCII letters, digits, `_`, `-` or `.`.",
                param="stream_id",
                code="invalid_stream_id",
            )
            await self.outbox.send(error_frame(refused, lane if isinstance(lane, str) else None))
            return True
        self.waiting_count += 1
        self.waiting_bytes += size
        if self.waiting_count > _QUEUED or self.waiting_bytes > self.proxy.settings.max_body_bytes:
            await self._close(CLOSE_POLICY, "too many messages while responses run")
            return False
        message["_size"] = size
        queue = self.waiting.get(lane)
        if queue is not None:
            queue.append(message)  # its lane is busy: first in, first out
            return True
        self.waiting[lane] = deque([message])
        assert self._nursery is not None
        self._nursery.start_soon(self._lane, lane)
        return True

    async def _lane(self, lane: str | None) -> None:
        """Run one lane's messages in order until none waits."""
        queue = self.waiting[lane]
        while queue:
            message = queue.popleft()
            async with self._running:
                self.waiting_count -= 1
                self.waiting_bytes -= message["_size"]
                await self._turn(lane, message)
        del self.waiting[lane]

    def _beside(self) -> UpstreamConnection | None:
        """The socket its own jobs are pending on, if any (never a one-turn socket held to
        relay an event: no session continues on that one)."""
        conn = self.conn
        if conn is None or not conn.owned_by(self) or conn.one_turn:
            return None
        return conn

    def _seated(self, lane: str | None) -> bool:
        """Whether a turn goes to its session's seat on a shared socket (lanes on): every
        default-lane turn, unless its default lane's chain lives on a socket of its own. A
        lane the client names runs on a socket of its own, whose lane names are its own."""
        if lane is not None or self.named_lanes or not self.proxy.settings.lanes:
            return False
        return self.default_conn is None or self.default_conn.shared

    async def _turn(self, lane: str | None, message: dict[str, Any]) -> None:
        size = message["_size"]
        body = {k: v for k, v in message.items() if k not in ("type", "_size")}
        if lane is None:
            # An answer to an event it relayed would land on this response: wait for it (or
            # for `ANSWER_WAIT` of silence) before starting anything on the default lane.
            while self.relayed:
                await self.relayed.pop(0).settled.wait()
        seated = self._seated(lane)
        beside = placing = None
        if not seated:
            while self._placing is not None:  # another lane is finding its socket: join it
                await self._placing.wait()
            beside = self._beside()
            if beside is None:
                placing = self._placing = trio.Event()
        try:
            if self.target.chatgpt:
                body = require_unstored(body)
            self.proxy.request_bytes += size
            stream = await self.proxy.open_turn(
                body,
                self.headers,
                self.target,
                request_id=request_id(self.headers),
                request_bytes=size,
                scope=self.scope,
                client="websocket-in",
                beside=beside,
                owner=self,
                seatable=seated,
            )
        except ApiError as exc:
            await self.outbox.send(error_frame(exc, lane))
            return
        finally:
            if placing is not None:
                self._placing = None
                placing.set()
        conn = stream.conn
        if lane is not None:
            self.named_lanes = True
        elif conn is None or not conn.one_turn:  # no chain lives on a one-turn socket
            self.default_conn = conn
        if conn is not None and not conn.shared and conn is not self.conn:
            self._let_go()
            self.conn = conn
        self.mine[stream.turn] = stream.conn
        try:
            await relay(stream, self.outbox, lane)
        finally:
            del self.mine[stream.turn]

    def _let_go(self) -> None:
        """A socket it held to relay an event goes back to the pool."""
        if self.held is not None:
            held, self.held = self.held, None
            self.proxy.registry.release(held, self)

    async def _steer(self, message: dict[str, Any]) -> None:
        """Steering goes to the socket where its target runs, only if that is one of this
        client's own running responses; otherwise it fails here (never reaching another's)."""
        target = message.get("previous_response_id")
        running = {
            turn.tracker.response.get("id"): conn
            for turn, conn in self.mine.items()
            if turn.end is None and turn.tracker.response is not None
        }
        conn = running.get(target) if isinstance(target, str) else None  # where it runs
        if conn is None:
            text = "No response of this client with that id is running on this connection."
            await self.outbox.send(steer_failed(message, "response_not_active", text))
            return
        if conn.shared:
            # Steering is these three fields (the SDK's README); on a shared socket nothing
            # else of a client's, a lane name say, may ride along to the other sessions'.
            message = {k: message[k] for k in _STEER_FIELDS if k in message}
        payload = orjson.dumps(message)  # as parsed: what was checked is what goes
        ended = steer_failed(
            message,
            "response_not_active",
            "The response ended, or its socket closed, before the steering could go.",
        )
        refusal = UpstreamEvent("response.steer.failed", ended, {})
        notice = Notice(payload, target, owner=self, sink=self.sink, refusal=refusal)
        if not conn.submit(notice, joining=self):
            text = "The response's socket is closing."
            await self.outbox.send(steer_failed(message, "response_not_active", text))

    async def _relay_unknown(self, message: dict[str, Any]) -> bool:
        """An event this proxy does not know goes upstream on the session's socket, and the
        answers come back as they come. Not while a response of this client runs on the
        default lane: the upstream answers such events there, and its `error` would end that
        response. Managed mode relays only what it can check for scope."""
        kind = message.get("type")
        if self.scope is not None:
            await self.outbox.send(error_frame(errors.unsupported_event(kind)))
            return True
        # (A seated turn's lane is the proxy's on a shared socket, which relays never use.)
        if None in self.waiting or any(t.end is None and t.lane is None for t in self.mine):
            await self.outbox.send(error_frame(errors.response_in_progress(kind)))
            return True
        self.relayed = [n for n in self.relayed if not n.settled.is_set()]
        if len(self.relayed) >= _LOOSE:  # events still awaiting their answers: bounded
            await self._close(CLOSE_POLICY, "too many events awaiting answers")
            return False
        payload = orjson.dumps(message)
        conn = self._beside() or self.held
        notice = Notice(payload, owner=self)
        if conn is not None and conn.submit(notice, joining=self):
            self.default_conn = conn
            self.relayed.append(notice)
            return True
        if conn is not None and conn.accepting:  # its queue of jobs is full
            await self.outbox.send(error_frame(errors.too_many_messages(kind)))
            return True
        self._let_go()
        try:
            conn = await self.proxy.hold_socket(self.headers, self.target, self.scope, self)
        except ApiError as exc:
            await self.outbox.send(error_frame(exc))
            return True
        # Its default lane runs here from now on: the event may set up the connection for
        # what follows, and is never sent on a shared socket, where it would reach (or be
        # taken for the answers of) other sessions.
        self.held = self.conn = self.default_conn = conn
        if conn.submit(notice, joining=self):
            self.relayed.append(notice)
        else:
            await self.outbox.send(error_frame(errors.upstream_closed("socket closing")))
        return True


def parse_request_event(data: bytes) -> dict[str, Any]:
    """A client message as an object with a string `type`; a `response.create` is checked
    like an HTTP request's body (and parsed as one: a large one in steps, bigjson.py)."""
    try:
        message = bigjson.loads(data)
    except ValueError as exc:
        raise ApiError(400, f"The message is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ApiError(
            400, "A message must be an object with a string `type`.", code="invalid_type"
        )
    if message["type"] == "response.create":
        check_body(message)  # the same checks as POST /v1/responses
    return message


async def relay(
    stream: TurnStream, outbox: trio.MemorySendChannel[str], lane: str | None = None
) -> None:
    """The turn's events as text frames, then its end: the upstream's terminal event as it
    came (unless steering already passed it on), or a nested `error` the proxy made."""
    try:
        async for event in stream:
            await outbox.send(event.raw)
        end = stream.end
        if end.event is not None and not end.delivered:
            await outbox.send(end.event.raw)
        elif end.error is not None and end.event is None:
            await outbox.send(error_frame(end.error, lane))
    finally:
        stream.abandon()  # a client gone mid-response: cancel it, evict the socket


def register(app: QuartTrio, ctx: AppContext) -> None:
    """WebSocket upgrades on the three responses routes: served, or 426 when
    `websocket_clients` is off."""

    async def refuse_upgrade() -> Response:
        """`websocket_clients` off: 426 at once, so a client that tries a WebSocket (Codex
        with `supports_websockets = true`) falls back to HTTP without waiting or retrying."""
        ctx.telemetry.refused_upgrades += 1
        error = ApiError(
            426,
            "This proxy serves the Responses API over HTTP (POST with SSE), not WebSocket; "
            "it keeps the upstream WebSocket for you.",
            type="invalid_request_error",
            code="websocket_not_supported",
        )
        return error_response(error)

    async def websocket_responses() -> Response | None:
        await serve(ctx.proxy, ctx.gate, "responses")
        return None

    async def websocket_codex() -> Response | None:
        await serve(ctx.proxy, ctx.gate, "chatgpt")
        return None

    for path, route in (
        ("/v1/responses", websocket_responses),
        ("/responses", websocket_responses),
        ("/backend-api/codex/responses", websocket_codex),
    ):
        app.add_websocket(
            path,
            f"websocket{path}",
            route if ctx.settings.websocket_clients else refuse_upgrade,
        )
