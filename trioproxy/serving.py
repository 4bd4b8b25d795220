"""How the app meets hypercorn: the end of every HTTP answer runs to completion.

Quart-trio runs each request as two tasks in one nursery: the handler, and a reader of the
request's ASGI messages that cancels the nursery when the server reports the client gone. When
an answer is given before the request's body was read (a refusal from the headers alone),
hypercorn closes the connection from inside the handler's last `send`: it first tells the app
the stream is over, which wakes the reader, which cancels the handler at hypercorn's next
checkpoint, which is the one before the socket is shut. The connection then stays open with
nobody serving it, and a keep-alive client waits on its next request forever. Shielding the
answer's last `send` lets hypercorn finish what it started; it already shields its own writes,
so this adds no wait that was not there.
"""

from __future__ import annotations

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent
from quart_trio.asgi import TrioASGIHTTPConnection


class WholeAnswers(TrioASGIHTTPConnection):
    """Quart-trio's HTTP connection with the answer's final `send` shielded."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        async def send_whole(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await super().__call__(receive, send_whole)
