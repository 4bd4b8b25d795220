"""Large request bodies handled in small steps, so one never stalls the event loop for long.

Parsing, planning and encoding a request of many megabytes run in a worker thread
(`turnstream.off_loop`), but a single C call holds the GIL for its whole length: the loop waits on
it. So what is done here is done a piece at a time, each piece a point where Python may switch
threads: a large body is parsed one `input` item at a time (the standard library's C scanner,
`raw_decode`, one call per item: nesting is bounded by its recursion limit), the upstream message
is encoded item by item, and a large body's items are freed in slices (dropping half a million
items at once is tens of milliseconds in one call). Below `STEPWISE_BYTES` orjson parses in one
call (about 10 ms per MB), faster and short enough. (ijson was tried: its prefixes grow with
nesting, and a 5 MB body of `[` took 24 GB.)
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

STEPWISE_BYTES = 4 * 1024 * 1024


def _float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ValueError(f"number {text[:32]} out of range")  # orjson refuses it too
    return value


def _int(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"integer {text[:32]} out of range")  # as orjson: 64 bits
    return value


# The standard library's scanner, made as strict as orjson where they differ (constants, floats
# out of range, integers past 64 bits); strings with lone surrogates are checked per value.
_DECODER = json.JSONDecoder(
    parse_constant=lambda name: _refuse(f"{name} is not JSON"),
    parse_float=_float,
    parse_int=_int,
)
_SPACE = re.compile(r"[ \t\n\r]*")


def _refuse(reason: str) -> Any:
    raise ValueError(reason)


def loads(raw: bytes) -> Any:
    """The JSON value of `raw` (ValueError if it is not JSON): in one orjson call, or for a
    large object a value, and an `input` item, at a time."""
    if len(raw) <= STEPWISE_BYTES or not raw.lstrip().startswith(b"{"):
        return orjson.loads(raw)
    try:
        return _object(raw.decode())
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _object(text: str) -> dict[str, Any]:
    """A top-level object, member by member; the `input` array item by item."""
    out: dict[str, Any] = {}
    pos = _skip(text, _skip(text, 0) + 1)  # past "{"
    if text.startswith("}", pos):
        return _end(text, pos + 1, out)
    while True:
        key, pos = _DECODER.raw_decode(text, pos)
        if not isinstance(key, str):
            raise ValueError("an object key must be a string")
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise ValueError(f"expected ':' at {pos}")
        pos = _skip(text, pos + 1)
        if key == "input" and text.startswith("[", pos):
            out[key], pos = _array(text, pos + 1)
        else:
            out[key], pos = _value(text, pos)
        pos = _skip(text, pos)
        if text.startswith("}", pos):
            return _end(text, pos + 1, out)
        if not text.startswith(",", pos):
            raise ValueError(f"expected ',' or '}}' at {pos}")
        pos = _skip(text, pos + 1)


def _array(text: str, pos: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    pos = _skip(text, pos)
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        item, pos = _value(text, pos)
        items.append(item)
        pos = _skip(text, pos)
        if text.startswith("]", pos):
            return items, pos + 1
        if not text.startswith(",", pos):
            raise ValueError(f"expected ',' or ']' at {pos}")
        pos = _skip(text, pos + 1)


def _value(text: str, pos: int) -> tuple[Any, int]:
    """One JSON value at `pos`, refused if orjson could not encode it back (a lone surrogate
    escaped in a string): what passes here goes upstream as JSON."""
    value, end = _DECODER.raw_decode(text, pos)
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return value, end


def _skip(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _end(text: str, pos: int, out: dict[str, Any]) -> dict[str, Any]:
    if _skip(text, pos) != len(text):
        raise ValueError("data after the JSON value")
    return out


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
