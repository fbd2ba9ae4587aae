"""The two hottest routes without FastAPI's router: `POST /keys` on the leader and
`POST /replicate` on followers, at a fraction of the CPU.

A request through FastAPI passes its exception and exit-stack middleware, a linear match
over every route, dependency solving, and a JSON parse followed by a separate validation:
about a third of the leader's CPU per write when profiled (benchmarks/cpu_per_write.py),
and a quarter of a follower's while it takes a snapshot (benchmarks/million.py).
:class:`FastJSONPost` answers the plain case itself, between the body limit (and, on
followers, the secret check) and FastAPI: a JSON body its pydantic model accepts, parsed
and validated in one pass (`model_validate_json`), handed to the same function the route
calls; an HTTPException becomes the same JSON error. Anything else (a body the model
refuses, another content type, for writes an unknown or malformed parameter) goes to
FastAPI untouched, with the body already read, so every error message and status is
FastAPI's own. The routes stay declared in FastAPI, so /docs still describes them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kv.web.access import check_key
from kv.web.asgi import header, read_body, replaying
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


class FastJSONPost:
    """Answers `POST path` with a JSON body that `model` accepts through `handle`, without
    FastAPI's router; `handle` returns None to leave a request to FastAPI after all."""

    def __init__(
        self,
        app: ASGIApp,
        path: str,
        model: type[BaseModel],
        handle: Callable[[Any, Scope], Awaitable[Response | None]],
    ) -> None:
        self.app = app
        self.path = path
        self.model = model
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive)
        except HTTPException as refused:  # the body limit, cutting off a chunked body
            await http_error_response(refused)(scope, receive, send)
            return
        if body is None:
            return  # the client went away before sending its body
        parsed = response = None
        if header(scope, b"content-type") == b"application/json":
            with contextlib.suppress(ValidationError):  # FastAPI explains it
                parsed = self.model.model_validate_json(body)
        if parsed is not None:
            try:
                response = await self.handle(parsed, scope)
            except HTTPException as refused:
                response = http_error_response(refused)
        if response is None:
            await self.app(scope, replaying(body, receive), send)
            return
        await response(scope, receive, send)


def fast_writes(app: ASGIApp, write: Write) -> FastJSONPost:
    """`POST /keys` through `write`, when its query holds no more than `w` and `timeout_ms`."""

    async def handle(request: WriteRequest, scope: Scope) -> Response | None:
        parameters = plain_parameters(scope["query_string"])
        if parameters is None:
            return None
        check_key(scope, request.key)  # a token limited to prefixes (AUTH_FILE)
        idempotency_key = header(scope, b"idempotency-key")
        key = None if idempotency_key is None else idempotency_key.decode("latin-1")
        return await write(request.key, request.value, *parameters, key)

    return FastJSONPost(app, "/keys", WriteRequest, handle)
