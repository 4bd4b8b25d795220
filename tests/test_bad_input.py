"""Bad input, generated: thousands of bodies and headers through the real app.

Hypothesis drives a synchronous test; each example is one request into an app that runs, with
the fake upstream, on a trio loop in a background thread (started once per module, so 10,000
examples cost seconds, not 10,000 server start-ups). Properties: never a 5xx, never a crash,
every 4xx in the OpenAI error shape, and nothing sent upstream for a request the proxy refused.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy.app import create_app
from trioproxy.config import Settings
from trioproxy.fake import FakeUpstream

EXAMPLES = 10_000
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Live:
    """The app and the fake, served from a trio loop in another thread."""

    token: trio.lowlevel.TrioToken
    client: Any
    fake: FakeUpstream
    requests: int = 0

    def send(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        async def go() -> tuple[int, bytes]:
            response = await self.client.post(path, data=body, headers=headers)
            return response.status_code, await response.get_data()

        self.requests += 1
        return trio.from_thread.run(go, trio_token=self.token)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    ready: list[Live] = []
    started, stop = threading.Event(), threading.Event()

    async def main() -> None:
        fake = FakeUpstream()
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.serve)
            app = create_app(Settings(upstream=fake.url, max_body_bytes=64 * 1024))
            async with app.test_app() as test_app:
                ready.append(Live(trio.lowlevel.current_trio_token(), test_app.test_client(), fake))
                started.set()
                await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(30), "the app did not start"
    yield ready[0]
    stop.set()
    thread.join(30)


# -- what gets generated ------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["model", "input", "stream", "store", "background", "tools", "instructions",
          "previous_response_id", "prompt", "reasoning"]  # fmt: skip
messy_objects = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6
)


@st.composite
def nearly_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with one field swapped for something arbitrary, or one removed."""
    body: dict[str, Any] = {"model": "gpt-test", "input": [{"role": "user", "content": "hi"}]}
    field = draw(st.sampled_from(FIELDS))
    if draw(st.booleans()):
        body[field] = draw(json_values)
    else:
        body.pop(field, None)
    return body


def encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(encoded),
    messy_objects.map(encoded),
    nearly_valid().map(encoded),
    st.just(b""),
    st.integers(70_000, 90_000).map(lambda n: b'{"model": "m", "input": "' + b"x" * n + b'"}'),
)
CONTENT_TYPES = [
    *("application/json", "application/json; charset=utf-8", "application/ld+json"),
    *("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"),
]
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=300)
headers = st.fixed_dictionaries(
    {},
    optional={
        "content-type": st.sampled_from(CONTENT_TYPES) | header_text,
        "authorization": st.sampled_from(["Bearer sk-test", "Basic x", ""]) | header_text,
        "session-id": st.sampled_from(["s1", "s" * 256, "s" * 257, "a b", "ü"]) | header_text,
        "x-session-affinity": header_text,
        "x-request-id": header_text,
    },
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same 10,000 cases every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
@given(path=st.sampled_from(["/v1/responses", "/responses"]), body=bodies, headers=headers)
def test_generated_requests_never_5xx_and_refusals_send_nothing_upstream(
    live: Live, path: str, body: bytes, headers: dict[str, str]
) -> None:
    before = len(live.fake.received)
    status, data = live.send(path, body, headers)
    assert status < 500, (status, data[:500])
    if status >= 400:
        error = json.loads(data)["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str)
        assert len(live.fake.received) == before  # refused: nothing went upstream
    else:
        assert status == 200


def test_the_generated_run_was_as_big_as_promised(live: Live) -> None:
    # Runs after the property test in this module: count what it actually sent.
    assert live.requests >= EXAMPLES, live.requests
