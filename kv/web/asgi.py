"""Small helpers for the raw ASGI middleware here (body limit, secret check, fast paths)."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes, as ASGI gives them), or None."""
    return next((value for key, value in scope["headers"] if key == name), None)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` once, then whatever the connection sends next."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
