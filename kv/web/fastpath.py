"""`POST /keys` without FastAPI's router: the leader's hottest route, at a fraction of the CPU.

A write through FastAPI passes its exception and exit-stack middleware, a linear match
over every route, and dependency solving for a body, two query parameters and a header:
about a third of the leader's CPU per write when profiled (benchmarks/cpu_per_write.py).
:class:`FastWrites` answers the plain case itself, between the body limit and FastAPI:
a JSON body that :class:`~kv.web.schemas.WriteRequest` accepts, and at most `w`,
`timeout_ms` (well-formed and in range) and an Idempotency-Key. It calls the same write
function as the route, and turns an HTTPException into the same JSON error. Anything else
(a body the model refuses, an unknown or malformed parameter, another content type) goes
to FastAPI untouched, with the body it already read, so every error message and status is
FastAPI's own. The route stays declared in FastAPI, so /docs and the OpenAPI schema still
describe it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kv.web.errors import http_error_response
from kv.web.schemas import WriteRequest

Write = Callable[[str, Any, int | None, float | None, str | None], Awaitable[Response]]
"""(key, value, w, timeout_ms, idempotency_key) -> the write's answer."""

MAX_TIMEOUT_MS = 3_600_000


def plain_parameters(query: bytes) -> tuple[int | None, float | None] | None:
    """`w` and `timeout_ms` from a query string, or None when it holds anything else (or
    either is malformed or out of range): FastAPI then answers, with its own 422."""
    w: int | None = None
    timeout_ms: float | None = None
    if not query:
        return w, timeout_ms
    seen = set()
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name in seen:
            return None
        seen.add(name)
        if name == "w" and value.isdigit():
            w = int(value)
        elif name == "timeout_ms":
            try:
                timeout_ms = float(value)
            except ValueError:
                return None
            if not (math.isfinite(timeout_ms) and 0 < timeout_ms <= MAX_TIMEOUT_MS):
                return None
        else:
            return None
    return w, timeout_ms


class FastWrites:
    """Answers plain `POST /keys` requests with `write`; passes everything else to `app`."""

    def __init__(self, app: ASGIApp, write: Write) -> None:
        self.app = app
        self.write = write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/keys" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        content_type = idempotency_key = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"idempotency-key":
                idempotency_key = value.decode("latin-1")
        try:
            body = await read_body(receive)
        except HTTPException as refused:  # the body limit, cutting off a chunked body
            await http_error_response(refused)(scope, receive, send)
            return
        if body is None:
            return  # the client went away before sending its body
        parameters = plain_parameters(scope["query_string"])
        request = None
        if content_type == b"application/json" and parameters is not None:
            with contextlib.suppress(ValidationError):  # FastAPI explains it
                request = WriteRequest.model_validate_json(body)
        if request is None or parameters is None:
            await self.app(scope, replaying(body, receive), send)
            return
        try:
            response = await self.write(request.key, request.value, *parameters, idempotency_key)
        except HTTPException as refused:
            response = http_error_response(refused)
        await response(scope, receive, send)


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
