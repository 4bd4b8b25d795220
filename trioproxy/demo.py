"""`make demo`: the bundled fake upstream, the proxy in front of it, and a 3-turn conversation
through the `openai` SDK; then what went upstream, turn by turn. Then the same proxy with
`--lanes`: eight sessions at once on one shared upstream socket."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import orjson
import trio
from hypercorn.trio import serve as hypercorn_serve

from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import Settings
from trioproxy.delta import plan_turn
from trioproxy.fake import FakeUpstream

INSTRUCTIONS = "You are a terse assistant. " * 40
TOOLS = [
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file from the workspace and return its contents. " * 8,
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "Path to read"}},
            "required": ["path"],
        },
    }
]
PROMPTS = ["Hello, proxy!", "Tell me what you heard.", "One more time, streamed."]


def converse(base_url: str) -> list[dict[str, Any]]:
    """What a user's program does: the SDK, a session header, the history echoed back."""
    from openai import OpenAI

    client = OpenAI(
        base_url=base_url,
        api_key="sk-demo",
        default_headers={"session-id": "demo-session"},
        max_retries=0,
    )
    history: list[Any] = []
    bodies = []
    for n, prompt in enumerate(PROMPTS, 1):
        history.append({"role": "user", "content": prompt})
        params: dict[str, Any] = dict(
            model="gpt-demo", instructions=INSTRUCTIONS, tools=TOOLS, store=False
        )
        bodies.append({**params, "input": list(history)})
        if n < len(PROMPTS):
            response = client.responses.create(input=history, **params)
        else:
            with client.responses.stream(input=history, **params) as stream:
                deltas = sum(1 for e in stream if e.type == "response.output_text.delta")
                response = stream.get_final_response()
            print(f"  (turn {n} streamed as {deltas} text deltas)")
        print(f"  turn {n}: user {prompt!r} -> assistant {response.output_text!r}")
        history += [item.model_dump(exclude_none=True) for item in response.output]
    return bodies


LANE_SESSIONS = 8


def many_sessions(base_url: str) -> None:
    """Eight users' programs at once, two turns each, every one with its own session."""
    from openai import OpenAI

    def session(n: int) -> None:
        client = OpenAI(
            base_url=base_url,
            api_key="sk-demo",
            default_headers={"session-id": f"demo-lanes-{n}"},
            max_retries=0,
        )
        history: list[Any] = [{"role": "user", "content": f"Hello from session {n}"}]
        for text in ("And again.", None):
            response = client.responses.create(model="gpt-demo", input=history, store=False)
            history += [item.model_dump(exclude_none=True) for item in response.output]
            if text is not None:
                history.append({"role": "user", "content": text})

    with ThreadPoolExecutor(LANE_SESSIONS) as pool:
        list(pool.map(session, range(LANE_SESSIONS)))


async def serve(nursery: trio.Nursery, settings: Settings) -> str:
    app = create_app(settings)
    binds = await nursery.start(partial(hypercorn_serve, app, hypercorn_config("127.0.0.1", 0)))
    return str(binds[0]).rstrip("/") + "/v1"


async def main() -> None:
    fake = FakeUpstream()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        base_url = await serve(nursery, Settings(upstream=fake.url))
        print(f"fake upstream: {fake.url}\nproxy:         {base_url}\n")
        bodies = await trio.to_thread.run_sync(converse, base_url)
        report(fake, bodies)
        laned = await serve(nursery, Settings(upstream=fake.url, lanes=True))
        sockets, turns = fake.sockets_opened, len(fake.creates())
        await trio.to_thread.run_sync(many_sessions, laned)
        report_lanes(fake, sockets, turns)
        nursery.cancel_scope.cancel()


def report_lanes(fake: FakeUpstream, sockets_before: int, turns_before: int) -> None:
    creates = fake.creates()[turns_before:]
    lanes = sorted({str(c.message.get("stream_id")) for c in creates})
    suffixes = sum(1 for c in creates if "previous_response_id" in c.message)
    print(
        f"\nWith --lanes: {LANE_SESSIONS} sessions at once, 2 turns each, on "
        f"{fake.sockets_opened - sockets_before} upstream socket(s), one lane each "
        f"({', '.join(lanes)}); {suffixes} of {len(creates)} turns sent as suffixes."
    )


def report(fake: FakeUpstream, bodies: list[dict[str, Any]]) -> None:
    print(f"\nWhat went upstream: {fake.sockets_opened} socket(s) opened")
    print(
        f"  {'turn':<5}{'socket':<8}{'mode':<8}{'previous_response_id':<26}{'items':>6}"
        f"{'bytes':>8}{'full':>8}"
    )
    for n, (received, body) in enumerate(zip(fake.creates(), bodies, strict=True), 1):
        message = received.message
        previous = message.get("previous_response_id")
        full = len(orjson.dumps(plan_turn(None, body).message))
        print(
            f"  {n:<5}{received.socket:<8}{'suffix' if previous else 'full':<8}"
            f"{(previous or '-')[:24]:<26}{len(message['input']):>6}{received.size:>8}{full:>8}"
        )
    print("\n'bytes' is what the proxy sent; 'full' is what the same request costs without it.")


if __name__ == "__main__":
    trio.run(main)
