"""The floor: the least a relay can do for trioproxy's job, a measuring stick for the bench.

    .venv/bin/python bench/floor.py --port 8790 --upstream ws://127.0.0.1:8765/v1/responses

HTTP/1.1 in (h11), SSE out, one upstream WebSocket per `session-id` (wsproto, kept between
turns), each turn planned by trioproxy's own planner (`trioproxy.delta.plan_turn`) against the
socket's remembered conversation, so it sends the same suffixes, and every upstream frame parsed
once by trioproxy's `parse_frame`, as the proxy does. Nothing else: no Quart, no hypercorn, no
trio-websocket, no extra tasks (the task serving a client connection drives the upstream socket
itself), no retries, no auth of its own, no pool limits. permessage-deflate is offered as
trioproxy offers it by default. Not a product: it exists so `make bench` can say how far the
proxy is from the limit of this design in Python, not only from its peers.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any
from urllib.parse import urlsplit

import h11
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from trioproxy.delta import Conversation, plan_turn
from trioproxy.events import TERMINAL, UpstreamEvent, parse_frame

READ = 65536
SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
]


class Upstream:
    """One upstream WebSocket and the conversation it holds; used by one turn at a time."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.memory: Conversation | None = None
        self.parts: list[str] = []  # a text message still arriving
        self.ready: list[str] = []  # whole messages not handed out yet

    @classmethod
    async def open(cls, url: str, authorization: str | None, deflate: bool) -> Upstream:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        assert parts.scheme == "ws" and parts.hostname, "the floor speaks plain ws:// only"
        stream = await trio.open_tcp_stream(parts.hostname, port)
        ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"authorization", authorization.encode())] if authorization else []
        offer = [PerMessageDeflate(server_no_context_takeover=True)] if deflate else []
        host = f"{parts.hostname}:{port}"
        target = parts.path or "/"
        request = Request(host=host, target=target, extensions=offer, extra_headers=headers)
        await stream.send_all(ws.send(request))
        upstream = cls(stream, ws)
        while True:
            data = await stream.receive_some(READ)
            if not data:
                raise ConnectionError("the upstream closed during the handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return upstream
                if isinstance(event, RejectConnection):
                    raise ConnectionError(f"the upstream refused: {event.status_code}")

    async def send(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(Message(data=text)))

    async def receive(self) -> list[str]:
        """The whole text messages one read brings (at least one)."""
        while not self.ready:
            data = await self.stream.receive_some(READ)
            if not data:
                raise ConnectionError("the upstream closed the socket")
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self.parts.append(event.data)
                    if event.message_finished:
                        self.ready.append("".join(self.parts))
                        self.parts.clear()
                elif isinstance(event, Ping):
                    await self.stream.send_all(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    raise ConnectionError(f"the upstream closed: {event.code}")
        out, self.ready = self.ready, []
        return out

    async def aclose(self) -> None:
        await self.stream.aclose()


class Floor:
    def __init__(self, upstream: str, deflate: bool) -> None:
        self.url = upstream
        self.deflate = deflate
        # Idle sockets by (session-id, authorization); a turn takes its socket out while it
        # runs, so a second concurrent turn of a session opens a socket of its own.
        self.pool: dict[tuple[str, str], Upstream] = {}

    async def serve(self, client: trio.SocketStream) -> None:
        """One client connection: its requests one after another, each turn driving its
        upstream socket from this task."""
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await next_event(client, conn)
                if not isinstance(request, h11.Request):
                    return
                body = bytearray()
                while not isinstance(event := await next_event(client, conn), h11.EndOfMessage):
                    if not isinstance(event, h11.Data):
                        return
                    body += event.data
                if request.method == b"POST" and request.target.endswith(b"/responses"):
                    await self.turn(client, conn, dict(request.headers), bytes(body))
                else:
                    await respond(client, conn, 200 if request.target == b"/healthz" else 404)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass  # the client left
        except Exception as exc:  # a bad body or frame ends this connection, not the server
            print(f"floor: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            await client.aclose()

    async def turn(
        self,
        client: trio.SocketStream,
        conn: h11.Connection,
        headers: dict[bytes, bytes],
        raw: bytes,
    ) -> None:
        body = orjson.loads(raw)
        if not isinstance(body, dict) or not body.get("stream"):
            await respond(client, conn, 400, b'{"error": "the floor only streams"}')
            return
        auth = headers.get(b"authorization", b"").decode()
        key = (headers.get(b"session-id", b"").decode(), auth)
        upstream = self.pool.pop(key, None) if key[0] else None
        try:
            if upstream is None:
                upstream = await Upstream.open(self.url, auth or None, self.deflate)
            plan = plan_turn(upstream.memory, body)
            await upstream.send(orjson.dumps(plan.message).decode())
        except (OSError, ConnectionError, trio.BrokenResourceError) as exc:
            if upstream is not None:
                await upstream.aclose()
            await respond(client, conn, 502, orjson.dumps({"error": str(exc)}))
            return
        head = conn.send(h11.Response(status_code=200, headers=SSE_HEADERS))
        streamed: dict[int, Any] = {}
        end: UpstreamEvent | None = None
        keep = True  # whether the socket may serve the session's next turn
        try:
            while end is None:
                try:
                    frames = await upstream.receive()
                except (OSError, ConnectionError, trio.BrokenResourceError) as exc:
                    error = {"type": "error", "error": {"code": "upstream", "message": str(exc)}}
                    frames, keep = [orjson.dumps(error).decode()], False
                out = []
                for n, frame in enumerate(frames):
                    event = parse_frame(frame)
                    text = frame if "\n" not in frame else orjson.dumps(event.data).decode()
                    out.append(f"event: {event.type}\ndata: {text}\n\n".encode())
                    if event.type == "response.output_item.done":
                        index = event.data.get("output_index")
                        at = index if isinstance(index, int) else len(streamed)
                        streamed[at] = event.data.get("item")
                    if event.type in TERMINAL:
                        end = event
                        keep = keep and n == len(frames) - 1  # nothing after it: not this turn's
                        break
                await client.send_all(head + conn.send(h11.Data(data=b"".join(out))))
                head = b""
            await client.send_all(conn.send(h11.EndOfMessage()))
        except BaseException:
            await upstream.aclose()  # the client left mid-turn: its response is still coming
            raise
        response = end.data.get("response")
        if end.type == "response.completed" and isinstance(response, dict):
            final = response.get("output")
            if isinstance(final, list) and final:
                forms = (final, streamed)
            else:
                forms = ([streamed[i] for i in sorted(streamed)], {})
            upstream.memory = plan.remember(*forms, str(response.get("id")))
        else:  # failed, incomplete, error: the next turn goes in full
            upstream.memory = None
        if keep and key[0]:
            self.pool[key] = upstream
        else:
            await upstream.aclose()


async def next_event(client: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await client.receive_some(READ))


async def respond(
    client: trio.SocketStream, conn: h11.Connection, status: int, body: bytes = b""
) -> None:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    await client.send_all(data + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--upstream", required=True, help="ws://HOST:PORT/v1/responses")
    parser.add_argument("--no-deflate", action="store_true", help="offer no permessage-deflate")
    args = parser.parse_args()
    floor = Floor(args.upstream, not args.no_deflate)
    serve = functools.partial(trio.serve_tcp, floor.serve, args.port, host=args.host, backlog=4096)
    trio.run(serve)
