"""Pure pieces: SSE framing, error mapping, validation, session keys, event tracking."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from trioproxy import keys, sse
from trioproxy.errors import ApiError, from_error_event, from_handshake_rejection
from trioproxy.events import TurnTracker, parse_frame
from trioproxy.validate import parse_request

BETA = "responses_websockets=2026-02-06"


# -- SSE ------------------------------------------------------------------------------------
def test_sse_block_relays_json_text_unchanged() -> None:
    raw = '{"type": "response.output_text.delta", "delta": "a\\nb", "sequence_number": 3}'
    assert sse.encode("response.output_text.delta", raw) == (
        b"event: response.output_text.delta\ndata: " + raw.encode() + b"\n\n"
    )


def test_sse_block_never_carries_a_raw_line_break() -> None:
    pretty = json.dumps({"type": "x", "delta": "y"}, indent=2)
    block = sse.encode("x", pretty)
    assert block.count(b"\n") == 3 and json.loads(block.split(b"data: ")[1]) == {
        "type": "x",
        "delta": "y",
    }


def test_sse_json_event() -> None:
    block = sse.encode_json({"type": "error", "code": "c", "sequence_number": 4})
    assert block == b'event: error\ndata: {"type":"error","code":"c","sequence_number":4}\n\n'


# -- error mapping --------------------------------------------------------------------------
def test_nested_socket_error_maps_to_status_and_body() -> None:
    err = from_error_event(
        {
            "type": "error",
            "status": 400,
            "error": {
                "type": "invalid_request_error",
                "code": "previous_response_not_found",
                "message": "Previous response with id 'resp_1' not found.",
                "param": "previous_response_id",
            },
        }
    )
    assert err.status == 400
    assert err.body() == {
        "error": {
            "message": "Previous response with id 'resp_1' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }


def test_nested_socket_error_maps_to_flat_sse_event() -> None:
    err = from_error_event(
        {
            "type": "error",
            "status": 429,
            "error": {
                "type": "rate_limit_error",
                "code": "rate_limit_exceeded",
                "message": "Rate limit reached. Please try again in 2s.",
                "param": None,
            },
        }
    )
    assert err.status == 429
    assert err.sse_event(7) == {
        "type": "error",
        "code": "rate_limit_exceeded",
        "message": "Rate limit reached. Please try again in 2s.",
        "param": None,
        "sequence_number": 7,
    }


def test_error_without_status_uses_code_then_type() -> None:
    assert (
        from_error_event(
            {
                "type": "error",
                "error": {"code": "websocket_connection_limit_reached", "message": "m"},
            }
        ).status
        == 429
    )
    assert from_error_event({"type": "error", "code": "server_error", "message": "m"}).status == 500
    assert (
        from_error_event(
            {
                "type": "error",
                "status": 9999,
                "error": {"type": "invalid_request_error", "message": "m"},
            }
        ).status
        == 400
    )


def test_handshake_rejection_keeps_openai_body_or_summarises() -> None:
    body = (
        b'{"error": {"message": "bad key", "type": "invalid_request_error",'
        b' "code": "invalid_api_key"}}'
    )
    err = from_handshake_rejection(401, body)
    assert (err.status, err.code, err.message) == (401, "invalid_api_key", "bad key")
    other = from_handshake_rejection(503, b"<html>down</html>")
    # The upstream's 503 is relayed as 502: a 503 of the proxy's means draining.
    assert other.status == 502 and other.code == "upstream_handshake_rejected"


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "param", "code"),
    [
        (b"", None, "invalid_json"),
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_type"),
        (b'"text"', None, "invalid_type"),
        (b'{"input": "x"}', "model", "missing_required_parameter"),
        (b'{"model": 5, "input": "x"}', "model", "invalid_type"),
        (b'{"model": "m", "input": 5}', "input", "invalid_type"),
        (b'{"model": "m", "input": {"a": 1}}', "input", "invalid_type"),
        (b'{"model": "m", "input": ["x"]}', "input[0]", "invalid_type"),
        (b'{"model": "m"}', "input", "missing_required_parameter"),
        (b'{"model": "m", "input": "x", "stream": "yes"}', "stream", "invalid_type"),
        (b'{"model": "m", "input": "x", "tools": {}}', "tools", "invalid_type"),
        (
            b'{"model": "m", "input": "x", "previous_response_id": 3}',
            "previous_response_id",
            "invalid_type",
        ),
        (
            b'{"model": "m", "input": "x", "background": true}',
            "background",
            "unsupported_parameter",
        ),
    ],
)
def test_bad_bodies_are_refused_with_the_field_named(
    raw: bytes, param: str | None, code: str
) -> None:
    with pytest.raises(ApiError) as caught:
        parse_request(raw)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.code == code
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_good_bodies_pass() -> None:
    assert parse_request(b'{"model": "m", "input": "x"}')["model"] == "m"
    assert parse_request(b'{"model": "m", "input": [], "stream": true}')["stream"] is True
    assert parse_request(b'{"model": "m", "previous_response_id": "r", "input": []}')


# -- session and pool keys ------------------------------------------------------------------
def H(**headers: str) -> list[tuple[str, str]]:
    return keys.normalise((k.replace("_", "-"), v) for k, v in headers.items())


def test_session_id_order() -> None:
    assert keys.session_id(H(x_thread_id="t", session_id="s")) == "s"
    assert keys.session_id([("x-session-affinity", "a"), ("x-conversation-id", "c")]) == "a"
    assert keys.session_id([("session_id", "u")]) == "u"
    assert keys.session_id(H(authorization="Bearer k")) is None


def test_pool_key_separates_what_changes_upstream_meaning() -> None:
    base = H(authorization="Bearer k1", session_id="s")
    url = "wss://up/v1/responses"
    key = keys.pool_key(url, base, BETA)
    assert key is not None and "k1" not in key
    assert (
        keys.pool_key(
            url,
            base
            + H(
                x_client_request_id="r1",
                traceparent="t",
                x_codex_turn_metadata="{}",
                x_codex_turn_state="ts_1",
                x_stainless_retry_count="1",
            ),
            BETA,
        )
        == key
    )
    for extra in (
        H(chatgpt_account_id="acct"),
        H(openai_organization="org"),
        H(openai_project="p"),
        H(originator="codex_exec"),
        H(openai_beta="x=1"),
        H(x_custom="v"),
    ):
        assert keys.pool_key(url, base + extra, BETA) != key, extra
    assert keys.pool_key(url, H(authorization="Bearer k2", session_id="s"), BETA) != key
    assert keys.pool_key("wss://other/v1/responses", base, BETA) != key
    assert keys.pool_key(url, H(authorization="Bearer k1", session_id="t"), BETA) != key
    # Without a session the key is the credential group's, which no session's key equals; a
    # `prompt_cache_key` of the same value as a header's session id is another session.
    assert keys.pool_key(url, H(authorization="Bearer k1"), BETA) is None
    group = keys.group_key(url, H(authorization="Bearer k1"), BETA)
    assert group not in (key, None) and keys.group_key(url, base, BETA) == group
    assert keys.pool_key(url, base, BETA, ("cache_key", "s")) not in (key, group)
    assert keys.affinity(H(authorization="Bearer k1"), "pck") == ("cache_key", "pck")
    assert keys.affinity(base, "pck") == ("header", "s")
    assert keys.affinity(H(authorization="Bearer k1"), "") is None


def test_header_values_that_cannot_go_on_the_wire_are_trimmed_or_dropped() -> None:
    headers = [("x-a", "  padded "), ("x-b", " "), ("x-c", "in\tner ok"), ("x-d", "bad\x01")]
    mark = keys.via([])  # every upstream request carries the proxy's loop mark
    assert keys.relayed(headers) == [("x-a", "padded"), ("x-c", "in\tner ok"), mark]
    assert ("x-b", " ") not in keys.forwarded(headers, BETA)


def test_forwarded_headers_add_the_beta_and_drop_hop_by_hop() -> None:
    out = dict(
        keys.forwarded(
            H(
                authorization="Bearer k",
                host="h",
                content_length="9",
                session_id="s",
                originator="codex_exec",
            ),
            BETA,
        )
    )
    assert out == {
        "authorization": "Bearer k",
        "session-id": "s",
        "originator": "codex_exec",
        "openai-beta": BETA,
        keys.VIA_HEADER: keys.INSTANCE,
    }
    # A client's own mark never passes as written: only proxies' ids, then this one's.
    hops = dict(keys.forwarded([(keys.VIA_HEADER, "abc, bad id!, def")], BETA))
    assert hops[keys.VIA_HEADER] == f"abc, def, {keys.INSTANCE}"
    assert keys.looped([(keys.VIA_HEADER, hops[keys.VIA_HEADER])])
    assert not keys.looped([(keys.VIA_HEADER, "abc, def")])
    merged = dict(keys.forwarded(H(openai_beta="assistants=v2"), BETA))
    assert merged["openai-beta"] == f"assistants=v2, {BETA}"
    already = dict(keys.forwarded(H(openai_beta=BETA), BETA))
    assert already["openai-beta"] == BETA


# -- event tracking -------------------------------------------------------------------------
def test_tracker_collects_output_and_spots_the_end() -> None:
    tracker = TurnTracker()
    item = {"type": "message", "role": "assistant", "content": []}
    assert tracker.feed(parse_frame('{"type": "response.created", "sequence_number": 0}')) is None
    done = {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": item,
        "sequence_number": 1,
    }
    assert tracker.feed(parse_frame(json.dumps(done))) is None
    end = parse_frame(
        json.dumps(
            {
                "type": "response.completed",
                "sequence_number": 2,
                "response": {"id": "r", "output": []},
            }
        )
    )
    assert tracker.feed(end) == "completed"
    assert tracker.output_items(end) == [item], "empty final output falls back to the stream"
    assert tracker.next_sequence == 3
    for kind in ("failed", "incomplete", "cancelled"):
        assert TurnTracker().feed(parse_frame(f'{{"type": "response.{kind}"}}')) == kind
    assert TurnTracker().feed(parse_frame('{"type": "error"}')) == "error"


@pytest.mark.parametrize("frame", ["not json", "[1]", '{"no": "type"}', '{"type": 3}'])
def test_unreadable_frames_are_refused(frame: str) -> None:
    with pytest.raises(ValueError):
        parse_frame(frame)


def test_hop_headers_never_go_upstream_and_the_first_session_header_wins() -> None:
    client = H(
        authorization="Bearer k",
        forwarded="for=10.0.0.1",
        x_forwarded_for="10.0.0.1",
        x_forwarded_proto="https",
        x_real_ip="10.0.0.1",
        origin="https://app.example",
        via="1.1 lb",
        x_trioproxy_scope="admin",
        user_agent="sdk",
    )
    for out in (keys.forwarded(client, BETA), keys.relayed(client)):
        names = {name for name, _ in out}
        assert "authorization" in names and "user-agent" in names
        assert not names & {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-real-ip"}
        assert not names & {"origin", "via", "x-trioproxy-scope"}
    twice = [("session-id", "first"), ("session-id", "second")]
    assert keys.session_id(twice) == "first"


def test_a_managed_channel_lets_only_allowed_client_headers_through_and_never_doubles() -> None:
    client = H(
        session_id="s",
        user_agent="ua",
        openai_project="p-client",
        openai_organization="o-client",
        x_codex_window_id="w",
        x_anything="v",
        originator="codex_exec",
    )
    own = keys.managed_own(client, ["OpenAI-Project", "originator"])
    assert own == [("session-id", "s"), ("user-agent", "ua"), ("x-codex-window-id", "w")]


def test_every_timeout_takes_fractions_from_the_environment() -> None:
    from dataclasses import fields

    from trioproxy.config import Settings

    floats = [f.name for f in fields(Settings) if isinstance(getattr(Settings(), f.name), float)]
    assert {"idle_ttl", "max_lifetime", "turn_timeout", "body_timeout"} <= set(floats)
    env = {f"TRIOPROXY_{name.upper()}": "1.5" for name in floats}
    env["TRIOPROXY_MAX_LIFETIME"] = "2.5"  # a turn must fit in a socket's lifetime
    settings = Settings.from_env(env)
    assert all(getattr(settings, name) == 1.5 for name in floats if name != "max_lifetime")


async def test_a_turns_buffer_is_bounded_in_bytes_as_well_as_events() -> None:
    """A client that stops reading holds at most `buffer_bytes` of events (one event of any
    size always passes): megabyte events no longer pile up 64 deep."""
    from trioproxy.delta import plan_turn
    from trioproxy.turn import Turn

    turn = Turn(plan_turn(None, {"model": "m", "input": "x"}), 64, buffer_bytes=1000)
    big = parse_frame(json.dumps({"type": "response.output_text.delta", "delta": "x" * 1200}))
    small = parse_frame(json.dumps({"type": "response.output_text.delta", "delta": "y" * 400}))
    delivered: list[str] = []

    async def produce() -> None:
        for event in (big, small, small, small):
            await turn.deliver(event)
            delivered.append(event.raw)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await trio.testing.wait_all_tasks_blocked()
        assert len(delivered) == 1 and turn.buffered_bytes == len(big.raw)  # one always passes
        assert (await turn.receive()) is big
        await trio.testing.wait_all_tasks_blocked()
        assert len(delivered) == 3  # two events of ~450 bytes fit in 1000; the third waits
        assert turn.buffered_bytes <= 1000
        for _ in range(3):
            await turn.receive()
    assert len(delivered) == 4 and turn.buffered_bytes == 0


def test_a_clients_own_marks_never_key_the_pool_and_the_mode_does() -> None:
    """A pass-through request that sends `x-trioproxy-login` or `-scope` headers must not land
    in the group of a held login's or a scope's sockets; nor may an unsendable credential pass
    as one."""
    from trioproxy.errors import ApiError
    from trioproxy.targets import Target
    from trioproxy.validate import check_headers

    url = "wss://chatgpt.example/backend-api/codex/responses"
    plain = H(authorization="Bearer t", chatgpt_account_id="acct")
    dressed = plain + H(x_trioproxy_login="/root/.codex/auth.json", x_trioproxy_scope="a")
    chatgpt = Target("chatgpt", url, BETA)
    assert chatgpt.upstream(dressed, None).group == chatgpt.upstream(plain, None).group
    assert (
        Target("api", url, BETA).upstream(plain, None).group != chatgpt.upstream(plain, None).group
    )
    with pytest.raises(ApiError) as refused:
        check_headers([("authorization", "Bearer x\x7f")])
    assert refused.value.status == 401
