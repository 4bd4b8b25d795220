"""Log output: one JSON object per line (the default for `serve`), or plain text for a terminal.

A record's structured `fields` (the turn log line passes them as `extra={"fields": ...}`) become
top-level keys, so a log pipeline can filter on `outcome`, `mode` or `request_id` without parsing
prose.
"""

from __future__ import annotations

import logging
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


class TextFormatter(logging.Formatter):
    """For a terminal: time, level, logger, message, then the record's fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            shown = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
            line = f"{line} {shown}" if shown else line
        return line


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger (ours, hypercorn's, trio-websocket's) to stderr in `fmt`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
