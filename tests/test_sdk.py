"""The `openai` SDK, as users run it, pointed at the proxy."""

from __future__ import annotations

from typing import Any

import trio
from openai import OpenAI

from tests.conftest import ProxyServer, start_proxy
from trioproxy.fake import FakeUpstream


def sdk(server: ProxyServer, session: str | None = "sdk-session") -> OpenAI:
    headers = {"session-id": session} if session else {}
    return OpenAI(
        base_url=server.base_url,
        api_key="sk-test-key",
        default_headers=headers,
        max_retries=0,
        timeout=30,
    )


async def in_thread(fn: Any, *args: Any) -> Any:
    """The SDK's sync client blocks; run it off the event loop that serves the proxy."""
    return await trio.to_thread.run_sync(fn, *args)


async def test_sdk_non_streaming(server: ProxyServer) -> None:
    client = sdk(server)
    response = await in_thread(lambda: client.responses.create(model="gpt-test", input="hello"))
    assert response.status == "completed"
    assert response.output_text == "You said: hello"
    assert response.usage is not None and response.usage.input_tokens > 0


async def test_sdk_streaming_with_typed_events(server: ProxyServer) -> None:
    client = sdk(server)

    def run() -> tuple[list[str], str]:
        types, text = [], ""
        with client.responses.stream(model="gpt-test", input="stream these words") as stream:
            for event in stream:
                types.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
            final = stream.get_final_response()
        assert final.output_text == text
        return types, text

    types, text = await in_thread(run)
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert text == "You said: stream these words"


async def test_sdk_conversation_reuses_one_socket(server: ProxyServer) -> None:
    client = sdk(server)

    def run() -> list[str]:
        history: list[Any] = [{"role": "user", "content": "one"}]
        ids = []
        for text in ("two", "three"):
            response = client.responses.create(model="gpt-test", input=history, store=False)
            ids.append(response.id)
            history += [item.model_dump(exclude_none=True) for item in response.output]
            history.append({"role": "user", "content": text})
        ids.append(client.responses.create(model="gpt-test", input=history, store=False).id)
        return ids

    ids = await in_thread(run)
    creates = server.fake.creates()
    assert server.fake.sockets_opened == 1
    assert [c.message.get("previous_response_id") for c in creates] == [None, ids[0], ids[1]]
    assert creates[2].message["input"] == [{"role": "user", "content": "three"}]


async def test_sdk_sees_upstream_errors_as_api_errors(server: ProxyServer) -> None:
    import openai

    client = sdk(server)

    def run() -> openai.APIStatusError:
        try:
            client.responses.create(model="gpt-test", input="fake: error rate_limit_exceeded 429")
        except openai.APIStatusError as exc:
            return exc
        raise AssertionError("expected an error")

    error = await in_thread(run)
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"


async def test_sdk_compact_is_relayed_over_http(server: ProxyServer) -> None:
    client = sdk(server)
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "second"},
    ]
    compacted = await in_thread(
        lambda: client.responses.compact(model="gpt-test", input=history)  # type: ignore[arg-type]
    )
    assert compacted.object == "response.compaction"
    assert [item.type for item in compacted.output] == ["message", "message", "compaction"]
    seen = server.fake.http_requests[-1]
    assert seen.method == "POST" and seen.target == "/v1/responses/compact"
    assert seen.headers["authorization"] == "Bearer sk-test-key"
    assert server.fake.sockets_opened == 0  # not a turn: no socket involved


async def test_sdk_conversations_without_a_session_share_a_socket_with_lanes(
    nursery: trio.Nursery, fake: FakeUpstream
) -> None:
    """The SDK's default (no session header) with lanes on: two conversations, one socket,
    each continued as a suffix on its own lane; the SDK's typed events carry no lane."""
    server = await start_proxy(nursery, fake, lanes=True)
    client = sdk(server, session=None)

    def converse(name: str) -> list[str]:
        history: list[Any] = [{"role": "user", "content": f"{name} one"}]
        ids = []
        for text in ("two", "three"):
            with client.responses.stream(model="gpt-test", input=history, store=False) as events:
                for event in events:
                    assert "stream_id" not in event.model_dump()
                response = events.get_final_response()
            ids.append(response.id)
            history += [item.model_dump(exclude_none=True) for item in response.output]
            history.append({"role": "user", "content": f"{name} {text}"})
        return ids

    await in_thread(converse, "a")
    await in_thread(converse, "b")
    creates = fake.creates()
    assert fake.sockets_opened == 1 and len(creates) == 4
    assert len({c.message["stream_id"] for c in creates}) == 2
    assert [len(c.message["input"]) for c in creates] == [1, 1, 1, 1]
