"""Small helpers for the raw ASGI middleware here (body limit, secret and token checks,
fast paths)."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import Message, Receive, Scope, Send

Header = tuple[bytes, bytes]


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


async def send_answer(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None = b"application/json",
    headers: Sequence[Header] = (),
) -> None:
    """A whole response from raw middleware, before FastAPI: its head (with the length)
    and its body."""
    head = [(b"content-length", str(len(body)).encode()), *headers]
    if content_type is not None:
        head.insert(0, (b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
