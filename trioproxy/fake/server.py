"""The fake upstream's WebSocket server: OpenAI's WebSocket mode, as far as a proxy can tell.

It keeps `store: false` responses on the socket that made them (a fresh socket answers
`previous_response_not_found`, as the real service does), runs each lane's (`stream_id`'s)
requests FIFO with up to 16 responses at once per socket and lets a client steer a running one
(`lanes.py`), streams realistic events, and records every handshake and message so tests can
assert what went upstream.
"""

from __future__ import annotations

import itertools
import json
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)
from wsproto.events import AcceptConnection
from wsproto.extensions import PerMessageDeflate

from trioproxy.fake import backend
from trioproxy.fake.events import compacted, new_id, response_events
from trioproxy.fake.lanes import (
    MAX_NAMED,
    Lane,
    Lanes,
    Running,
    request_error,
    requested_lane,
    steer_items,
)
from trioproxy.fake.script import Reply, decide
from trioproxy.items import input_items
from trioproxy.wsclient import CountingStream

log = logging.getLogger("trioproxy.fake")


@dataclass(frozen=True, slots=True)
class Received:
    """One client message as the upstream saw it."""

    socket: int  # 1 for the first socket opened, 2 for the next, ...
    message: dict[str, Any]
    size: int  # bytes of the text frame
    # Bytes that crossed the wire for it (after permessage-deflate, with framing); the same
    # as `size` where the fake does not see the wire (in-memory test sockets, HTTP bodies).
    wire: int = 0


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One plain HTTP request as the upstream saw it (model list, token endpoint)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class _Socket:
    number: int
    ws: WebSocketConnection
    chatgpt: bool  # opened on the Codex backend's path: `store` must be false
    headers: dict[str, str]
    # store=false responses: this socket only, shared by all of its lanes
    responses: dict[str, list[Any]] = field(default_factory=dict)
    lanes: Lanes = field(default_factory=Lanes)
    deflate: bool = False  # permessage-deflate negotiated
    wire: _Replay | None = None  # the counted transport, when the fake owns it
    wire_mark: int = 0  # wire bytes received up to the previous message
    opened: float = 0.0  # trio time of its upgrade: the service ends a connection at 60 min


class FakeUpstream:
    def __init__(
        self,
        *,
        event_delay: float = 0.0,
        require_auth: bool = True,
        record_frames: bool = False,
        keep_messages: bool = True,
    ) -> None:
        self.event_delay = event_delay
        # Keep each received message whole (tests read them); a load run keeps only sizes.
        self.keep_messages = keep_messages
        # response id -> the exact text frames sent for it (tests compare streams byte for byte;
        # off by default so a long-running fake does not grow)
        self.transcripts: dict[str, list[str]] | None = {} if record_frames else None
        self.require_auth = require_auth
        self.received: list[Received] = []
        self.handshakes: list[dict[str, str]] = []
        self.replies: deque[Reply] = deque()
        self.stored: dict[str, list[Any]] = {}  # store=true responses: any socket resolves them
        self.logins = backend.Logins()  # ChatGPT logins issued for the Codex backend's path
        self.refusals: deque[tuple[int, str]] = deque()  # handshakes to refuse, in order
        self.stall_handshakes = False  # accept TCP, never answer the upgrade
        self.http_requests: list[HttpRequest] = []
        self.http_posts: list[Received] = []  # turns that came over HTTP (socket 0)
        self.websocket_enabled = True  # False: every upgrade gets 404, as an HTTP-only provider
        # Accept permessage-deflate when a client offers it (Codex does; so does the proxy).
        self.deflate = True
        # The largest message a socket takes; a larger one is refused with a 1009 close (the
        # live limit is not documented; tests lower this one to see the proxy's answer).
        self.max_message_bytes = 256 * 2**20
        # A reasoning item's ciphertext differs between `output_item.done` and
        # `response.completed`, as live responses re-encrypt it (DESIGN.md section 2b).
        self.reencrypt = True
        # Response metadata the upgrade's 101 (and an HTTP turn's answer) carries, as the live
        # services send it: the Codex backend its `x-codex-*` rate limits and turn state, the
        # API its `x-ratelimit-*`. Tests may replace either list.
        self.chatgpt_headers: list[tuple[str, str]] = [
            ("x-codex-primary-used-percent", "42"),
            ("x-codex-primary-window-minutes", "300"),
            ("x-codex-primary-reset-at", "1900000000"),
            ("x-codex-secondary-used-percent", "7.5"),
            ("x-codex-secondary-window-minutes", "10080"),
            ("x-codex-secondary-reset-at", "1900500000"),
            ("x-reasoning-included", "true"),
        ]
        self.api_headers: list[tuple[str, str]] = [
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-tokens", "29999000"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("openai-version", "2020-10-01"),
        ]
        # A second `response.create` while one runs waits its turn (its lane's FIFO), as live;
        # False: it is refused with 409 `response_already_in_flight`, as this fake once did.
        self.queue_creates = True
        self.max_active = 0  # the most responses running at once on any one socket
        self.stream_ids: dict[int, list[str]] = {}  # socket number -> named lanes, first use first
        self.response_lanes: dict[str, str | None] = {}  # response id -> its lane (None: default)
        # store=false: a lane's response is dropped from the connection's cache once the lane
        # continues from it (forks must come first); False keeps every response.
        self.lane_cache = True
        # Distinct named lanes a connection accepts (the service's 32); tests lower it.
        self.named_limit = MAX_NAMED
        # False: a provider without lanes, refusing any `stream_id` as `invalid_stream_id`.
        self.lanes_enabled = True
        # The service's connection lifetime: past it every create is refused with
        # `websocket_connection_limit_reached` (echoing its lane).
        self.max_socket_age = 60 * 60.0
        self.port = 0
        self.events_sent = 0
        self.http_dropped = 0  # HTTP connections the client dropped before the answer ended
        self._numbers = itertools.count(1)
        self._open: dict[int, _Socket] = {}
        self._changed = trio.Event()

    # -- what tests read and steer -----------------------------------------------------------
    @property
    def sockets_opened(self) -> int:
        return len(self.handshakes)

    @property
    def open_sockets(self) -> int:
        return len(self._open)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/responses"

    @property
    def chatgpt_url(self) -> str:
        """The Codex backend's WebSocket endpoint, as `wss://chatgpt.com/backend-api/codex`."""
        return f"ws://127.0.0.1:{self.port}/backend-api/codex/responses"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth/token"

    def queue(self, *replies: Reply) -> None:
        """Answer the next turns with these replies, in order, before any default answer."""
        self.replies.extend(replies)

    def stats(self) -> dict[str, int]:
        """Counters a load run reads from another process (`GET /_fake/stats`)."""
        creates = self.creates()
        return {
            "sockets_opened": self.sockets_opened,
            "open_sockets": self.open_sockets,
            "ws_turns": len(creates),
            "ws_bytes": sum(r.size for r in creates),
            "ws_wire_bytes": sum(r.wire for r in creates),
            "http_turns": len(self.http_posts),
            "http_bytes": sum(r.size for r in self.http_posts),
            "events_sent": self.events_sent,
        }

    def recent_sizes(self, count: int = 200) -> dict[str, list[int]]:
        """Sizes of the last `count` turns received over sockets and over HTTP, oldest first."""
        return {
            "ws": [r.size for r in self.creates()[-count:]],
            "ws_wire": [r.wire for r in self.creates()[-count:]],
            "http": [r.size for r in self.http_posts[-count:]],
        }

    def refuse_handshakes(self, status: int, code: str, count: int = 1) -> None:
        """Refuse the next `count` WebSocket handshakes with this status and error code."""
        self.refusals.extend([(status, code)] * count)

    def creates(self) -> list[Received]:
        return [r for r in self.received if r.message.get("type") == "response.create"]

    def steers(self) -> list[Received]:
        return [r for r in self.received if r.message.get("type") == "response.steer"]

    @property
    def active_responses(self) -> int:
        """Responses running now, over every open socket (`max_active`: the peak on one)."""
        return sum(sock.lanes.active for sock in self._open.values())

    async def send_stray(self, frame: str) -> None:
        """Send a frame on every open socket, between turns: what a broken upstream (a late
        duplicate event, an error about nothing) does to an idle socket."""
        for sock in list(self._open.values()):
            await sock.ws.send_message(frame)

    async def ping_sockets(self) -> None:
        """Ping every open socket and wait for each pong, as a load balancer or the live API's
        keep-alive does to an idle connection (a client that never answers is cut)."""
        for sock in list(self._open.values()):
            await sock.ws.ping()

    async def close_sockets(self, code: int = 1001, reason: str = "going away") -> None:
        """Close every open socket from the upstream side (an idle cut, a 60-minute limit)."""
        for sock in list(self._open.values()):
            await sock.ws.aclose(code, reason)

    async def wait_open_sockets(self, count: int) -> None:
        """Wait until exactly `count` sockets are open (used to see closes land)."""
        await self._until(lambda: self.open_sockets == count)

    async def wait_http_dropped(self, count: int) -> None:
        """Wait until `count` HTTP connections have been dropped by their clients."""
        await self._until(lambda: self.http_dropped >= count)

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._changed.wait()

    def _notify(self) -> None:
        # Synchronous, so it also runs from a `finally` in a cancelled handler.
        self._changed.set()
        self._changed = trio.Event()

    # -- serving -----------------------------------------------------------------------------
    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[FakeUpstream] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `host:port` (0: any free port, then read `.port`) until cancelled; with
        `tls` (a server context), over TLS as the live API is (`wss://`).

        One port serves both WebSocket upgrades and plain HTTP (the model list, the token
        endpoint), as `chatgpt.com` does: the request head decides.
        """
        async with trio.open_nursery() as nursery:
            if tls is None:
                listeners = await nursery.start(
                    partial(trio.serve_tcp, self._on_connection, port, host=host)
                )
                self.port = listeners[0].socket.getsockname()[1]
            else:
                secure = await nursery.start(
                    partial(trio.serve_ssl_over_tcp, self._on_connection, port, tls, host=host)
                )
                self.port = secure[0].transport_listener.socket.getsockname()[1]
            task_status.started(self)

    async def _on_connection(self, stream: trio.abc.Stream) -> None:
        async with stream:
            head = await _read_head(stream)
            if head is None:
                return
            if b"upgrade: websocket" in head.lower():
                async with trio.open_nursery() as nursery:
                    wire = _Replay(stream, head)
                    request = await wrap_server_stream(
                        nursery, wire, max_message_size=self.max_message_bytes
                    )
                    await self.handle(request, wire)
                    # The reader task finishes the close handshake on its own; give it a
                    # moment (cancelling it at once could strand a close waiting on it).
                    nursery.cancel_scope.deadline = trio.current_time() + 2
            else:
                try:
                    await self._serve_http(stream, head)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The client went away mid-answer (a gateway cut short, a reset): its
                    # connection ends; the server, and every other connection, carries on.
                    self.http_dropped += 1
                    self._notify()

    async def _serve_http(self, stream: trio.abc.Stream, head: bytes) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return
        chunks = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        seen = HttpRequest(
            request.method.decode(), request.target.decode(), headers, b"".join(chunks)
        )
        self.http_requests.append(seen)
        path = seen.target.split("?")[0].rstrip("/")
        if seen.method == "POST" and path in _RESPONSE_PATHS:
            await self._serve_sse(stream, conn, seen, path)
            return
        status, payload = self.answer_http(seen)
        await _send_json(stream, conn, status, payload)

    async def _serve_sse(
        self, stream: trio.abc.Stream, conn: h11.Connection, seen: HttpRequest, path: str
    ) -> None:
        """`POST /responses` over HTTP, as the HTTP fallback uses it: the full input in, the
        response's events out as SSE, one event per chunk, paced like the socket's."""
        refused = self._refusal(path, seen.headers)
        if refused:
            await _send_json(stream, conn, refused[0], json.loads(_error_body(refused[1], "no")))
            return
        try:
            request = json.loads(seen.body)
        except ValueError:
            await _send_json(stream, conn, 400, json.loads(_error_body("invalid_json", "bad")))
            return
        if path.startswith("/backend-api/codex/") and request.get("store") is not False:
            await _send_json(stream, conn, 400, json.loads(_error_body("invalid_value", "store")))
            return
        kept = request if self.keep_messages else {"type": "http"}
        self.http_posts.append(Received(0, kept, len(seen.body), len(seen.body)))
        previous = request.get("previous_response_id")
        history = self.stored.get(previous) if isinstance(previous, str) else []
        if history is None:  # over HTTP only stored responses resolve
            body = _error_body("previous_response_not_found", f"no response {previous}")
            await _send_json(stream, conn, 400, json.loads(body))
            return
        reply, rid, events, conversation, output = self._prepare(request, history)
        if reply.kind == "error" and not reply.after_events:
            await _send_json(stream, conn, reply.status, {"error": events[0]["error"]})
            return
        if reply.kind in ("text", "call") and request.get("store", True) is not False:
            self.stored[rid] = conversation + output
        limit = reply.after_events if reply.kind in ("drop", "stall") else len(events)
        metadata = self.chatgpt_headers if path.startswith("/backend-api/") else self.api_headers
        head = [
            ("content-type", "text/event-stream"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),  # one request per connection: say so, clients reconnect
            *metadata,
        ]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=head)))
        delay = reply.delay or self.event_delay
        for event in events[:limit]:
            if delay:
                await trio.sleep(delay)
            frame = json.dumps(event)
            block = f"event: {event['type']}\ndata: {frame}\n\n".encode()
            await stream.send_all(conn.send(h11.Data(data=block)))
            self.events_sent += 1
        if reply.kind == "stall":
            await trio.sleep_forever()
        if reply.kind != "drop":
            await stream.send_all(conn.send(h11.EndOfMessage()))

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        """Why the upstream refuses a request's credentials, if it does."""
        if path.startswith("/backend-api/codex/"):
            return self.logins.check(
                headers.get("authorization", ""), headers.get("chatgpt-account-id")
            )
        if self.require_auth and not headers.get("authorization", "").startswith("Bearer "):
            return 401, "invalid_api_key"
        return None

    def _prepare(
        self,
        request: dict[str, Any],
        history: list[Any],
        reply: Reply | None = None,
        *,
        scripted: bool = True,
    ) -> tuple[Reply, str, list[dict[str, Any]], list[Any], list[Any]]:
        """The reply to a request and its events: (reply, id, events, conversation, output).

        `scripted=False` leaves the test's queued replies for explicit requests.
        """
        conversation = history + input_items(request.get("input"))
        if reply is None:
            queued = scripted and self.replies
            reply = self.replies.popleft() if queued else decide(conversation)
        rid = new_id("resp")
        context = {k: request.get(k) for k in ("instructions", "tools")}
        input_bytes = len(json.dumps([conversation, context]))
        cached = len(json.dumps([history, context])) if request.get("previous_response_id") else 0
        events, output = response_events(
            rid,
            request,
            reply,
            input_bytes=input_bytes,
            cached_bytes=cached,
            reencrypt=self.reencrypt,
        )
        return reply, rid, events, conversation, output

    def answer_http(self, request: HttpRequest) -> tuple[int, Any]:
        """Plain HTTP other than turns: the token endpoint, model lists, compaction."""
        path = request.target.split("?")[0].rstrip("/")
        if request.method == "POST" and path == "/oauth/token":
            return self.logins.refresh_grant(request.body)
        if request.method == "GET" and path == "/_fake/stats":
            return 200, {**self.stats(), "recent_sizes": self.recent_sizes()}
        routes = {
            ("GET", "/backend-api/codex/models"),
            ("GET", "/v1/models"),
            ("POST", "/backend-api/codex/responses/compact"),
            ("POST", "/v1/responses/compact"),
            ("POST", "/responses/compact"),
        }
        if (request.method, path) not in routes:
            return 404, json.loads(_error_body("not_found", f"no route {request.target}"))
        refused = self._refusal(path, request.headers)
        if refused:
            return refused[0], json.loads(_error_body(refused[1], "not authorised"))
        if path.endswith("/models"):
            chatgpt = path.startswith("/backend-api/")
            return 200, backend.models_list() if chatgpt else backend.api_models_list()
        try:
            return 200, compacted(json.loads(request.body))
        except ValueError:
            return 400, json.loads(_error_body("invalid_json", "body is not JSON"))

    async def handle(self, request: WebSocketRequest, wire: _Replay | None = None) -> None:
        """Serve one socket from its handshake to its close (`wire`: its counted transport)."""
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        offers = [str(e) for e in request._event.extensions]  # wsproto takes them out of headers
        if offers:
            headers["sec-websocket-extensions"] = ", ".join(offers)
        self.handshakes.append(headers)
        if request.path.rstrip("/").split("?")[0] not in (
            "/v1/responses",
            "/responses",
            "/backend-api/codex/responses",
        ):
            await request.reject(404, body=_error_body("not_found", f"no route {request.path}"))
            return
        if self.stall_handshakes:
            await trio.sleep_forever()
        if not self.websocket_enabled:
            await request.reject(404, body=_error_body("not_found", "no WebSocket here"))
            return
        if self.refusals:
            status, code = self.refusals.popleft()
            await request.reject(status, body=_error_body(code, f"refused by the fake ({status})"))
            return
        chatgpt = request.path.startswith("/backend-api/codex/")
        refused = self._refusal(request.path, headers)
        if refused:
            await request.reject(refused[0], body=_error_body(refused[1], "not authorised"))
            return
        deflate = self.deflate and any(
            offer.split(";", 1)[0].strip() == "permessage-deflate" for offer in offers
        )
        # The client sends nothing before our 101, so what was read by now is its handshake;
        # once accepted, the reader may take its first message before this task runs again.
        mark = wire.received if wire is not None else 0
        metadata = self.chatgpt_headers if chatgpt else self.api_headers
        if chatgpt:  # the Codex backend hands each socket a turn state to echo back
            metadata = [*metadata, ("x-codex-turn-state", new_id("ts"))]
        ws = await _accept(request, deflate, metadata)
        sock = _Socket(
            next(self._numbers),
            ws,
            chatgpt,
            headers,
            lanes=Lanes(self.named_limit),
            deflate=deflate,
            wire=wire,
            opened=trio.current_time(),
        )
        sock.wire_mark = mark
        self._open[sock.number] = sock
        self.stream_ids[sock.number] = sock.lanes.named
        self._notify()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        raw = await ws.get_message()
                    except ConnectionClosed:
                        break
                    self._on_message(sock, raw, nursery)
                nursery.cancel_scope.cancel()
        finally:
            del self._open[sock.number]
            self._notify()

    def _on_message(self, sock: _Socket, raw: str | bytes, nursery: trio.Nursery) -> None:
        size = len(raw.encode() if isinstance(raw, str) else raw)
        try:
            message = json.loads(raw)
        except ValueError:
            message = {"type": "<unparsable>"}
        kind = message.get("type") if isinstance(message, dict) else None
        kept = message if self.keep_messages else {"type": kind}
        wire = size
        if sock.wire is not None:
            wire, sock.wire_mark = sock.wire.received - sock.wire_mark, sock.wire.received
        self.received.append(Received(sock.number, kept, size, wire))
        if kind == "response.create":
            self._on_create(sock, message, nursery)
        elif kind == "response.steer":
            failure = sock.lanes.steer(message)  # None: its target's lane sends the answer
            if failure is not None:
                nursery.start_soon(self._send_all, sock, [failure])
        else:  # on the default lane, whatever lane the message named
            text = "expected response.create or response.steer"
            error = request_error(400, "unknown_event", text)
            nursery.start_soon(self._send_all, sock, [error])

    def _on_create(self, sock: _Socket, message: dict[str, Any], nursery: trio.Nursery) -> None:
        """Queue a `response.create` on its lane (drained by a task of its own), or refuse it
        at once with an error echoing its lane."""
        sid, refusal = requested_lane(message)
        if refusal is None and sid is not None and not self.lanes_enabled:
            text = "stream_id is not supported on this connection."
            refusal = request_error(400, "invalid_stream_id", text, sid, "stream_id")
        if refusal is None and trio.current_time() - sock.opened >= self.max_socket_age:
            text = "This connection reached its 60 minute limit; open a new one."
            refusal = request_error(400, "websocket_connection_limit_reached", text, sid)
        if refusal is None:
            refusal = self._refused_create(sock, message)
            if refusal is not None and sid is not None:
                refusal["stream_id"] = sid
        refusal = refusal or sock.lanes.admit(sid)
        if refusal is not None:
            nursery.start_soon(self._send_all, sock, [refusal])
            return
        lane = sock.lanes.enqueue(sid, message)
        if lane is not None:
            nursery.start_soon(self._drain, sock, lane)

    def _refused_create(self, sock: _Socket, message: dict[str, Any]) -> dict[str, Any] | None:
        """The error refusing a create before it is queued, if any."""
        refused = sock.chatgpt and self.logins.check(
            sock.headers.get("authorization", ""), sock.headers.get("chatgpt-account-id")
        )
        if refused:  # the token the socket opened with has since lapsed or been revoked
            status, code = refused
            return request_error(status, code, code)
        if sock.chatgpt and message.get("store") is not False:
            return request_error(400, "invalid_value", "Store must be false")
        if not self.queue_creates and sock.lanes.busy:
            text = "A response is already in flight on this socket."
            return request_error(409, "response_already_in_flight", text)
        return None

    async def _drain(self, sock: _Socket, lane: Lane) -> None:
        """Run a lane's requests FIFO, each once one of the socket's 16 slots is free; a
        steered response's successor runs next, in the same slot."""
        lanes = sock.lanes
        try:
            while lane.waiting:
                request: dict[str, Any] | None = lane.waiting.popleft()
                async with lanes.slots:
                    lanes.active += 1
                    self.max_active = max(self.max_active, lanes.active)
                    try:
                        auto = False
                        while request is not None:
                            request = await self._respond(sock, request, lane.stream_id, auto)
                            auto = True
                    finally:
                        lanes.active -= 1
        except ConnectionClosed:
            pass
        finally:
            lane.draining = False

    async def _respond(
        self, sock: _Socket, request: dict[str, Any], sid: str | None, auto: bool = False
    ) -> dict[str, Any] | None:
        """Run one response on lane `sid`; the successor's request when steers follow it
        (`auto`: this is such a successor, answered from its conversation, not the queue)."""
        previous = request.get("previous_response_id")
        history: list[Any] | None = []
        if isinstance(previous, str):
            history = sock.responses.get(previous) or self.stored.get(previous)
            queued = sock.lanes.pending.pop(previous, [])
            if queued:  # steering input that waited for this tool output goes first
                items = [*steer_items(queued), *input_items(request.get("input"))]
                request = {**request, "input": items}
        lost = Reply.error("previous_response_not_found", 400) if history is None else None
        reply, rid, events, conversation, output = self._prepare(
            request, history or [], lost, scripted=not auto
        )
        # A same-lane continuation refused with a 4xx/5xx evicts its parent from the
        # connection's cache; a fork from another lane leaves it (responses_websocket README,
        # "Continuation and service state").
        same_lane = isinstance(previous, str) and self.response_lanes.get(previous, "") == sid
        if reply.kind == "error" and lost is None and same_lane:
            sock.responses.pop(str(previous), None)
        if reply.kind == "garbage":
            await sock.ws.send_message("this is not an event")
            return None
        run = sock.lanes.start(rid, sid, request, conversation, self._sender(sock, rid))
        self.response_lanes[rid] = sid
        if (
            same_lane
            and not auto
            and lost is None
            and request.get("store") is False
            and self.lane_cache
        ):
            # With store=false the connection keeps a lane's latest response: once the client
            # advances the lane, its parent is gone, so a fork must start before
            # (responses_websocket README, "Forks": wait for the fork's response.in_progress
            # before advancing). A steered response's own successor keeps it (`auto`).
            sock.responses.pop(str(previous), None)
        try:
            if reply.kind not in ("drop", "stall"):
                for frame in reply.prelude:
                    await sock.ws.send_message(frame)
            if reply.kind in ("text", "call"):
                # Remembered before the last event goes out: a client may chain at once.
                self._remember(sock, rid, request, conversation + output)
            return await self._run(sock, run, events, reply)
        finally:
            sock.lanes.running.pop(rid, None)

    def _remember(self, sock: _Socket, rid: str, request: dict[str, Any], items: list[Any]) -> None:
        sock.responses[rid] = items
        if request.get("store", True) is not False:
            self.stored[rid] = items

    async def _run(
        self, sock: _Socket, run: Running, events: list[dict[str, Any]], reply: Reply
    ) -> dict[str, Any] | None:
        """Stream a response, ending it early if steered; then settle its steers: the
        successor's request, or `response.steer.pending`/`failed` on its lane."""
        limit = reply.after_events if reply.kind in ("drop", "stall") else len(events)
        steered = await run.stream(events[:limit], reply.delay or self.event_delay)
        if not steered and reply.kind == "drop":
            await sock.ws.aclose(1011, "dropped by the fake upstream")
            return None
        while not steered and reply.kind == "stall":  # silent until the client gives up
            await run.steered()
            steered = await run.interject()
        if steered:
            items = run.conversation + run.progress.output()
            self._remember(sock, run.rid, run.request, items)
            await run.emit(run.incomplete())
        await run.interject()  # steers accepted while the terminal went out
        successor, notes = sock.lanes.conclude(run)
        for event in notes:
            await run.emit(event)
        return successor

    def _sender(self, sock: _Socket, rid: str) -> Callable[[str], Awaitable[None]]:
        """How a response's frames go out: counted, and kept when transcripts are on."""
        sent = None if self.transcripts is None else self.transcripts.setdefault(rid, [])

        async def send(frame: str) -> None:
            await sock.ws.send_message(frame)
            self.events_sent += 1
            if sent is not None:
                sent.append(frame)

        return send

    async def _send_all(self, sock: _Socket, events: list[dict[str, Any]]) -> None:
        """Events outside any response (refusals), paced like a response's."""
        for event in events:
            if self.event_delay:
                await trio.sleep(self.event_delay)
            await sock.ws.send_message(json.dumps(event))
            self.events_sent += 1


_RESPONSE_PATHS = frozenset({"/v1/responses", "/responses", "/backend-api/codex/responses"})


async def _send_json(
    stream: trio.abc.Stream, conn: h11.Connection, status: int, payload: Any
) -> None:
    body = json.dumps(payload).encode()
    head = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    await stream.send_all(
        conn.send(h11.Response(status_code=status, headers=head))
        + conn.send(h11.Data(data=body))
        + conn.send(h11.EndOfMessage())
    )


def _error_body(code: str, message: str) -> bytes:
    return json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()


async def _read_head(stream: trio.abc.Stream, limit: int = 65536) -> bytes | None:
    """Bytes up to and including the end of the request head (and whatever came with it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = await stream.receive_some(limit)
        except trio.BrokenResourceError:
            return None
        if not chunk or len(data) > limit:
            return None
        data += chunk
    return data


async def _accept(
    request: WebSocketRequest, deflate: bool, headers: list[tuple[str, str]]
) -> WebSocketConnection:
    """Accept the upgrade with these response headers, and permessage-deflate if `deflate`
    (the client offered it).

    `WebSocketRequest.accept` cannot pass extensions to wsproto, so this does what it does
    (trio-websocket 0.12's `WebSocketConnection._accept`) with an extension list added.
    """
    extra = [(name.encode(), value.encode()) for name, value in headers]
    if not deflate:
        return await request.accept(extra_headers=extra)
    conn = request._connection
    conn._subprotocol = None
    conn._path = request.path
    await conn._send(AcceptConnection(extensions=[PerMessageDeflate()], extra_headers=extra))
    conn._open_handshake.set()
    return conn


class _Replay(CountingStream):
    """A counted stream whose first bytes were already read: they are handed out again first."""

    def __init__(self, stream: trio.abc.Stream, first: bytes) -> None:
        super().__init__(stream)
        self._first = first
        self.received = len(first)  # bytes off the wire, the handshake's included

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._first:
            first, self._first = self._first, b""
            return first
        return await super().receive_some(max_bytes)
