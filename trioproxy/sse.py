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
