"""trioproxy: HTTP/SSE Responses API in, one pooled upstream Responses WebSocket per session out."""

__version__ = "0.1.0"
