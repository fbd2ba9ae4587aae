"""Request bodies are limited while they are read, never after."""

from __future__ import annotations

import logging
import resource

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kv.web.asgi import header
from kv.web.errors import error_body


class RejectLargeBodies:
    """413 for bodies over `limit` bytes, decided while reading and never after.

    A declared Content-Length over the limit is refused before a byte of body is
    read; a body of undeclared length (chunked) is cut off as soon as it passes the
    limit. Either way the node never holds more than `limit` bytes of one request,
    and the answer has the same JSON shape as every other 4xx here.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.message = f"request body is over the limit of {limit} bytes (from MAX_VALUE_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                response = JSONResponse(
                    error_body(self.message), status_code=413, headers={"connection": "close"}
                )
                await response(scope, receive, send)
                return
            # The server reads no more than a declared length: nothing left to count.
            await self.app(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI lets an HTTPException from reading the body through to the
                    # exception handlers, which answer it like any other 4xx.
                    raise StarletteHTTPException(413, self.message, {"connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, as Go programs do at
    start-up: every client connection is a file, and a soft limit of 1,024 (many systems'
    default) would let a thousand idle connections lock everyone else out. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:  # a container may refuse; then keep the soft one
        logging.getLogger("kvstore").warning("could not raise the open-file limit: %s", error)
        return soft
    return hard
