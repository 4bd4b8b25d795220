"""Log output: one JSON object per line (the default for `serve`), or plain text for a terminal.

A record's structured `fields` (the turn log line passes them as `extra={"fields": ...}`) become
top-level keys, so a log pipeline can filter on `outcome`, `mode` or `request_id` without parsing
prose.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _visible(text: str) -> str:
    """Control characters escaped: a client's path or header must not start a forged line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class TextFormatter(logging.Formatter):
    """For a terminal: time, level, logger, message, then the record's fields as key=value,
    one line per record whatever they contain."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        head = self.formatTime(record, self.datefmt)
        line = f"{head} {record.levelname} {record.name} {_visible(record.getMessage())}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            shown = " ".join(f"{k}={_visible(str(v))}" for k, v in fields.items() if v is not None)
            line = f"{line} {shown}" if shown else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)  # a traceback is many lines
        return line


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger (ours, hypercorn's, trio-websocket's) to stderr in `fmt`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
