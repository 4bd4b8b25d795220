"""Large request bodies handled in small steps, so one never stalls the event loop for long.

Parsing, planning and encoding a request of many megabytes run in a worker thread
(`proxy.off_loop`), but a single C call holds the GIL for its whole length: the loop waits on
it. So what is done here is done a piece at a time, each piece a point where Python may switch
threads: the upstream message is encoded item by item, and a large body's items are freed in
slices (dropping half a million items at once is tens of milliseconds in one call). Parsing
stays one orjson call (about 10 ms per MB): an incremental parser without a nesting limit
(ijson) let a 5 MB body of `[` take 24 GB, and orjson refuses nesting beyond 1,024.
"""

from __future__ import annotations

from typing import Any

import orjson

# Below this many items an `input` is encoded in one call: it is short either way.
_STEPWISE_ITEMS = 1024
_RELEASE_SLICE = 2048


def release(body: dict[str, Any]) -> None:
    """Empty a large body's `input` a slice at a time (in a worker thread, once the turn no
    longer needs it): freeing half a million items in one go holds the GIL for tens of ms,
    wherever the last reference happens to drop."""
    items = body.get("input")
    if isinstance(items, list):
        while items:
            del items[-_RELEASE_SLICE:]


def dumps_message(message: dict[str, Any]) -> bytes:
    """`orjson.dumps(message)` (its `input` last, as `delta` builds it), with a long `input`
    encoded one item at a time."""
    items = message.get("input")
    if not isinstance(items, list) or len(items) < _STEPWISE_ITEMS:
        return orjson.dumps(message)
    rest = orjson.dumps({k: v for k, v in message.items() if k != "input"})
    encoded = b",".join(orjson.dumps(item) for item in items)
    joiner = b',"input":[' if len(rest) > 2 else b'"input":['
    return rest[:-1] + joiner + encoded + b"]}"
