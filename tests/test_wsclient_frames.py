"""The upstream socket's own reading of whole text frames (wsclient.py `_split`).

Nearly every upstream event is one unfragmented text frame. The socket's task takes those
itself, without wsproto's per-frame Python, and hands everything else (control frames,
fragments, binary, anything odd) to wsproto whole and in order. What comes out must be exactly
what wsproto alone would give, however the bytes are split into reads, with or without
permessage-deflate and its context takeover; and the failures must close with wsproto's codes.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio
import trio.lowlevel
import trio.testing
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, BytesMessage, Ping, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from trioproxy.wsclient import open_websocket

Script = Callable[[WSConnection, random.Random, list[str | bytes]], bytes]
SPLITS = (1, 2, 3, 7, 100, 4096, 16384, 70000)


def text(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.1:
        return ""
    if pick < 0.6:
        return "".join(rng.choice('abc{}":, é€😀') for _ in range(rng.randint(1, 300)))
    if pick < 0.9:
        return "x" * rng.randint(100, 70_000)
    return "y" * rng.randint(65_536, 200_000)


def mixed(fragments: bool) -> Script:
    """Text, fragmented text with a ping inside (`fragments`: wsproto's sender cannot split a
    compressed message), binary and pings, in a random order."""

    def script(server: WSConnection, rng: random.Random, expected: list[str | bytes]) -> bytes:
        out = bytearray()
        for _ in range(rng.randint(1, 40)):
            pick = rng.random()
            if pick < 0.7:
                data = text(rng)
                expected.append(data)
                out += server.send(TextMessage(data=data))
            elif pick < 0.8 and fragments:
                data = text(rng)
                expected.append(data)
                cut = rng.randint(0, len(data))
                out += server.send(TextMessage(data=data[:cut], message_finished=False))
                if rng.random() < 0.5:
                    out += server.send(Ping(payload=b"p"))
                out += server.send(TextMessage(data=data[cut:], message_finished=True))
            elif pick < 0.9:
                raw = bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 50)))
                expected.append(raw)
                out += server.send(BytesMessage(data=raw))
            else:
                out += server.send(Ping(payload=b"x"))
        return bytes(out)

    return script


async def read_all(
    script: Script,
    *,
    seed: int = 0,
    deflate: bool = False,
    context: bool = False,
    limit: int = 1 << 20,
) -> tuple[list[str | bytes], list[str | bytes], int | None]:
    """What the client read of `script`'s frames, sent in random splits; what was sent; the
    close code, if the client closed."""
    rng = random.Random(seed)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = WSConnection(ConnectionType.SERVER)
    expected: list[str | bytes] = []
    got: list[str | bytes] = []
    code = None
    opened = trio.Event()  # frames come after the upgrade's read, as they do on a real socket

    async def serve() -> None:
        events: list[object] = []
        while not events:
            server.receive_data(await server_stream.receive_some(65536))
            events = list(server.events())
        request = events[0]
        assert isinstance(request, Request)
        offered = [PerMessageDeflate(server_no_context_takeover=not context)] if deflate else []
        await server_stream.send_all(server.send(AcceptConnection(extensions=offered)))
        out = script(server, rng, expected)
        await opened.wait()
        at = 0
        while at < len(out):
            step = rng.choice(SPLITS)
            await server_stream.send_all(out[at : at + step])
            await trio.lowlevel.checkpoint()
            at += step
        while await server_stream.receive_some(65536):  # pongs, the close
            pass

    async def opener(target: object) -> trio.abc.Stream:
        return client_stream

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            async with open_websocket(
                "ws://peer/v1/responses",
                [],
                deflate=deflate,
                events_context=context,
                connect_timeout=5,
                close_timeout=0.01,
                max_message_size=limit,
                opener=opener,
            ) as sock:
                opened.set()
                while len(got) < len(expected) or not expected:
                    got.append(await sock.receive())
        except ConnectionClosed as exc:
            code = exc.reason.code
        nursery.cancel_scope.cancel()
    return got, expected, code


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(("deflate", "context"), [(False, False), (True, False), (True, True)])
async def test_any_split_of_any_frames_reads_as_wsproto_alone_would(
    seed: int, deflate: bool, context: bool
) -> None:
    script = mixed(fragments=not deflate)
    got, expected, code = await read_all(script, seed=seed, deflate=deflate, context=context)
    assert code is None and got == expected


async def test_whole_text_frames_do_not_reach_wsproto(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast way is taken (it rests on wsproto 1.x's decoder state: if that changes, this
    fails rather than the proxy quietly reading everything the slow way)."""
    fed: list[bytes] = []
    receive = Connection.receive_data

    def counting(self: Connection, data: bytes | None) -> None:
        if self.client and data:
            fed.append(data)
        receive(self, data)

    monkeypatch.setattr(Connection, "receive_data", counting)

    def texts(server: WSConnection, rng: random.Random, expected: list[str | bytes]) -> bytes:
        expected.extend(f'{{"n": {n}}}' for n in range(50))
        return b"".join(server.send(TextMessage(data=str(m))) for m in expected)

    got, expected, _ = await read_all(texts)
    assert got == expected
    assert not fed


@pytest.mark.parametrize(
    ("frame", "deflate", "code"),
    [
        (b"\x81\x02\xff\xfe", False, 1007),  # not UTF-8: wsproto fails it, as before
        (b"\xc1\x03abc", True, 1007),  # not a deflate stream
        (b"\xc1\x03abc", False, 1002),  # compressed, though deflate was not agreed
        (b"\x81\x7e\x00\x05hello", False, 1002),  # a length not in its shortest form
        # A masked frame (a server never masks):
        (
            b"\x81\x85abcd" + bytes(a ^ b for a, b in zip(b"hello", b"abcda", strict=True)),
            False,
            1002,
        ),
    ],
)
async def test_a_bad_frame_closes_with_wsproto_s_code(
    frame: bytes, deflate: bool, code: int
) -> None:
    def bad(server: WSConnection, rng: random.Random, expected: list[str | bytes]) -> bytes:
        return frame

    _, _, closed = await read_all(bad, deflate=deflate)
    assert closed == code


@pytest.mark.parametrize("deflate", [False, True])
async def test_a_message_past_the_limit_closes_with_1009(deflate: bool) -> None:
    def large(server: WSConnection, rng: random.Random, expected: list[str | bytes]) -> bytes:
        return server.send(TextMessage(data="y" * 5000))

    _, _, closed = await read_all(large, deflate=deflate, limit=1000)
    assert closed == 1009
