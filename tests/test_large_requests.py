"""One large request does not stall every other client.

A request of hundreds of thousands of items is parsed, digested and planned in a worker thread
(trioproxy/proxy.py `off_loop`), so the event loop keeps answering everyone else. The proxy and
the fake upstream run as processes of their own here, so the only event loop measured is the
proxy's (the fake parsing the 10 MB frame must not count against it).
"""

from __future__ import annotations

import subprocess
from functools import partial

import httpx
import orjson
import pytest
import trio

from tests.conftest import AUTH
from tests.test_processes import VENV_BIN, free_port, wait_ready


async def test_other_clients_stay_fast_while_a_huge_request_is_planned(
    nursery: trio.Nursery,
) -> None:
    """A 12 MB input of 300,000 items: health checks every 10 ms meanwhile. Before, one waited
    1,305 ms; now the median is 5-6 ms and the slowest 52-102 ms over three runs, on a 2-core
    machine that the fake (parsing the same 12 MB frame) and the client share (the bounds
    below leave room for a loaded CI machine)."""
    fake_port, port = free_port(), free_port()
    trioproxy = str(VENV_BIN / "trioproxy")
    run = partial(
        trio.run_process, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    )
    fake = await nursery.start(run, [trioproxy, "fake-upstream", "--port", str(fake_port)])
    upstream = f"ws://127.0.0.1:{fake_port}/v1/responses"
    serve = [trioproxy, "serve", "--port", str(port), "--upstream", upstream]
    proxy = await nursery.start(run, serve)
    base = f"http://127.0.0.1:{port}"
    await wait_ready(f"{base}/healthz")
    items = [{"role": "user", "content": f"item {n}"} for n in range(300_000)]
    body = orjson.dumps({"model": "m", "input": items})
    assert len(body) > 10_000_000
    waits: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            done = trio.Event()

            async def send_big() -> None:
                headers = {**AUTH, "content-type": "application/json"}
                reply = await client.post("/v1/responses", content=body, headers=headers)
                assert reply.status_code == 200, reply.text[:300]
                done.set()

            async with trio.open_nursery() as inner:
                inner.start_soon(send_big)
                while not done.is_set():
                    start = trio.current_time()
                    assert (await client.get("/healthz")).status_code == 200
                    waits.append(trio.current_time() - start)
                    await trio.sleep(0.01)
    finally:
        for process in (proxy, fake):
            process.kill()
    assert len(waits) > 20  # the big turn took long enough for the checks to mean something
    waits.sort()
    print(
        f"\n{len(waits)} health checks: median {waits[len(waits) // 2] * 1000:.0f} ms, "
        f"slowest {waits[-1] * 1000:.0f} ms"
    )
    assert waits[len(waits) * 9 // 10] < 0.1, f"10 % of checks waited over {waits[-1]:.3f} s"
    # The slowest single check: a planner on the event loop held one for 1,305 ms; a loaded CI
    # machine once held one for 505 ms with the planner off the loop (2026-12-02), so the bound
    # sits between, and the 90th percentile above carries the everyday signal.
    assert waits[-1] < 0.8, f"a health check waited {waits[-1] * 1000:.0f} ms"


def test_the_stepwise_encoder_gives_orjsons_bytes_and_release_empties_the_items() -> None:
    from trioproxy import bigjson

    items = [{"role": "user", "content": f"item {n} \u00e9\U0001f600", "n": n} for n in range(5000)]
    message = {"type": "response.create", "model": "m", "input": items}
    assert bigjson.dumps_message(message) == orjson.dumps(message)
    assert bigjson.dumps_message({"input": items}) == orjson.dumps({"input": items})
    body = {"model": "m", "input": items}
    bigjson.release(body)
    assert body == {"model": "m", "input": []}


def test_deep_nesting_is_refused_not_built() -> None:
    """A body of nothing but `[` (within the size limit) is a clear 400, not gigabytes."""
    from trioproxy.errors import ApiError
    from trioproxy.validate import parse_request

    for body in (b"[" * 5_000_000, b'{"model": "m", "input": [' + b"[" * 5_000_000):
        with pytest.raises(ApiError) as refused:
            parse_request(body)
        assert refused.value.status == 400 and refused.value.code == "invalid_json"


def test_a_large_body_is_parsed_item_by_item_to_orjsons_answer() -> None:
    from trioproxy import bigjson

    items = [
        {"role": "user", "content": f'{n} \u00e9 \\ "q"', "n": n, "f": 1.5} for n in range(120_000)
    ]
    body = {"model": "m", "instructions": "i", "input": items, "tools": [{"a": [None, True]}]}
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2)  # white space between everything
    assert len(raw) > bigjson.STEPWISE_BYTES
    assert bigjson.loads(raw) == body
    for broken in (raw[:-1], raw + b"x", raw.replace(b'"n": 7,', b'"n": NaN,', 1)):
        with pytest.raises(ValueError):
            bigjson.loads(broken)


def test_the_stepwise_parser_refuses_what_orjson_refuses() -> None:
    """Above the threshold the standard library's scanner parses; what orjson would refuse
    (a lone surrogate, an integer past 64 bits, a float out of range) is refused too, as a
    400, not a 500 later when the items are digested."""
    from trioproxy import bigjson
    from trioproxy.errors import ApiError
    from trioproxy.validate import parse_request

    pad = b" " * (bigjson.STEPWISE_BYTES + 1)
    for bad in (b'"\\ud800"', b"100000000000000000000000000000", b"1e400"):
        body = b'{"model": "m", "input": [{"role": "user", "content": ' + bad + b"}]}" + pad
        with pytest.raises(ApiError) as refused:
            parse_request(body)
        assert refused.value.status == 400, bad
