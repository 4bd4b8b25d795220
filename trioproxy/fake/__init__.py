"""A fake Responses WebSocket upstream: for the demo, the tests and the benchmarks."""

from trioproxy.fake.script import Reply
from trioproxy.fake.server import FakeUpstream, Received

__all__ = ["FakeUpstream", "Received", "Reply"]
