"""The request size limit, enforced before any route reads the body (an ASGI middleware).

A body over the limit is answered 413 in one JSON line. Up to DRAIN_BYTES of it are read and dropped first, so a
client that sends its whole body before reading the answer (most do) hears the 413 instead of a reset connection;
a larger one is cut off. Bodies within the limit are kept in memory (never spooled to disk) and replayed.
"""
from __future__ import annotations

import json

DRAIN_BYTES = 128 * 2**20


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            return await _reply(send, 400, "the Content-Length header is not a number")
        body, received, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            more = message.get("more_body", False)
            too_big = too_big or received > self.max_bytes
            if too_big and received > DRAIN_BYTES:
                break
            if not too_big:
                body += chunk
        if too_big:
            mb = self.max_bytes / 2**20
            return await _reply(send, 413, f"the request is larger than the limit of {mb:g} MB (--max-upload-mb); "
                                           f"send smaller images")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


async def _reply(send, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
