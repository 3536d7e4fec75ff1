"""How long and how large a request's body may be: an ASGI middleware in front of the routes.

A client sending its body slowly (a byte a second) would otherwise hold a connection and a
Gateway slot for as long as it likes: uvicorn bounds idle keep-alive connections, not the
time a body takes to arrive. Here the body must be complete within `timeout_s` of the
request reaching the app (408 otherwise, and the connection is closed: the response ends
before the request did) and hold at most `max_bytes` (413, checked against Content-Length
before reading when given). Both apply behind Serve's proxy and on the Gateway replica's own
port (direct ingress), since the replica's `receive` waits on the client's bytes in both.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import HTTPException


class RequestBodyLimits:
    """ASGI middleware. The limits are class attributes set by the Gateway's constructor
    (`configure`): Serve freezes a copy of the FastAPI app when the Gateway class is
    decorated, before any configuration exists, and builds its middleware in the replica,
    whose one Gateway is the only writer."""

    timeout_s: float = 30.0
    max_bytes: int = 64 * 2**20

    @classmethod
    def configure(cls, timeout_s: float, max_bytes: int) -> None:
        cls.timeout_s, cls.max_bytes = timeout_s, max_bytes

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timeout_s, max_bytes = self.timeout_s, self.max_bytes
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > max_bytes:
            return await _reply(send, 413, f"a request body of {int(length)} bytes; the limit is {max_bytes}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        received, complete = 0, False

        async def bounded_receive():
            nonlocal received, complete
            # Raised inside the app, an HTTPException reaches FastAPI's exception handling, which answers it.
            if complete:  # after the body: the app waits for a disconnect, unbounded
                return await receive()
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0)):
                    message = await receive()
            except TimeoutError:
                # Connection: close, else Serve's proxy keeps the connection open, reading the rest.
                raise HTTPException(408, f"the request body did not arrive within {timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise HTTPException(413, f"the request body is over the limit of {max_bytes} bytes",
                                        headers={"Connection": "close"})
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, bounded_receive, send)


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
