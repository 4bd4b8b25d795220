"""Server-Sent Events framing. Pure: bytes out, no I/O.

Upstream frames are relayed as they came, so a turn costs no re-encoding; only a frame that would
break SSE framing (a raw line break inside pretty-printed JSON) is re-serialised compactly.
"""

from __future__ import annotations

from typing import Any

import orjson


def encode(event_type: str, data: str) -> bytes:
    """One SSE block: `event: <type>` then `data: <one-line JSON>`, blank-line terminated."""
    if "\n" in data or "\r" in data:
        data = orjson.dumps(orjson.loads(data)).decode()
    return f"event: {event_type}\ndata: {data}\n\n".encode()


def encode_json(payload: dict[str, Any]) -> bytes:
    """An SSE block for an event the proxy itself produces (such as a flat `error`)."""
    return (
        b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    )


class Decoder:
    """An upstream SSE byte stream in, each event's `data` out (the HTTP fallback's reader).

    Handles any chunking, CRLF or LF line ends, multi-line `data`, comments (keep-alives) and
    the `[DONE]` sentinel some servers send. Bounded: an event larger than `max_bytes` is an
    error rather than unbounded growth.
    """

    def __init__(self, max_bytes: int) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []
        self._max = max_bytes

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        out: list[str] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            if not line:
                if self._data:
                    data = "\n".join(self._data)
                    self._data = []
                    if data != "[DONE]":
                        out.append(data)
            elif not line.startswith(b":"):
                name, _, value = line.partition(b":")
                if name == b"data":
                    self._data.append(value.removeprefix(b" ").decode())
        if len(self._buffer) > self._max:
            raise ValueError(f"an SSE event larger than {self._max} bytes")
        return out
