"""Plain HTTP calls relayed to a target's HTTP base: the requests that are not turns.

Codex's model list (`GET /backend-api/codex/models`) and compaction (`POST /responses/compact`,
the SDK's `responses.compact` and Codex's remote compaction; a 404 there breaks a long session)
go upstream as one HTTP request each, with the credentials a turn would use, and come back with
the status and body the upstream sent.
"""

from __future__ import annotations

import trio

from trioproxy import errors, httpclient
from trioproxy.httpclient import HttpResponse
from trioproxy.targets import Target, http_url

# Response headers passed back to the client.
RELAYED_BACK = frozenset({"content-type", "etag", "cache-control", "x-request-id"})


async def relay(
    target: Target,
    method: str,
    path_and_query: str,
    headers: list[tuple[str, str]],
    body: bytes,
    token: str | None,
    scope: str | None,
    *,
    seconds: float,
    max_bytes: int,
) -> HttpResponse:
    """The upstream's answer; raises `ApiError` (502) when there is none."""
    path, _, query = path_and_query.partition("?")
    url = http_url(target.url, path, query)
    try:
        with trio.fail_after(seconds):
            reply = await httpclient.request(
                method,
                url,
                headers=target.http_headers(headers, token, scope),
                body=body,
                max_bytes=max_bytes,
            )
    except httpclient.HttpError as exc:
        raise errors.upstream_unreachable(str(exc)) from None
    except trio.TooSlowError:
        raise errors.upstream_unreachable(f"no answer within {seconds:g} s") from None
    kept = [(name, value) for name, value in reply.headers if name in RELAYED_BACK]
    return HttpResponse(reply.status, kept, _redacted(reply))


def _redacted(reply: HttpResponse) -> bytes:
    """The body, with key-like tokens masked in an error's: an upstream 401 quotes the key it
    was sent, and for a managed client that is the channel's (`errors.redact`)."""
    if reply.status < 400:
        return reply.body
    try:
        text = reply.body.decode()
    except UnicodeDecodeError:
        return reply.body
    return errors.redact(text).encode()
