"""HTTP pieces that both roles share: the read routes and error bodies.

Every error leaves a node as `{"error": "<one sentence>", "detail": ...}` with a
4xx status, so a client never has to guess what it did wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas import (
    MAX_KEY_LENGTH,
    ErrorResponse,
    KeyList,
    KeyValue,
    Role,
    StateResponse,
)
from store import VersionedStore

KeyPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        description="The key, URL-encoded: `/`, `?`, `%`, `#` and spaces are all allowed.",
    ),
]

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "The key is absent or deleted."}
}


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
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
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


def error_body(message: str, detail: Any = None) -> dict[str, Any]:
    return ErrorResponse(error=message, detail=detail).model_dump()


def summarise_validation(errors: list[Any]) -> str:
    parts = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            parts.append(f"the body is not valid JSON ({reason} at position {loc[-1]})")
        elif error.get("type") == "model_attributes_type" and loc == ("body",):
            parts.append("the body must be a JSON object, sent with Content-Type: application/json")
        else:
            location = ".".join(str(part) for part in loc[1:] if loc) or "body"
            parts.append(f"{location}: {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        # The raw input can be a megabyte of JSON; the message and location say enough.
        detail = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]
        return JSONResponse(error_body(summarise_validation(errors), detail), status_code=422)

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        status = exc.status_code
        if status == 400 and message == "There was an error parsing the body":
            # FastAPI's answer to a body that is not even text: the same 422 as bad JSON.
            status, message = 422, "invalid request: the body is not valid JSON (UTF-8 text)"
        if status == 422:
            # Every 422 has the shape /docs documents for it: a list of problems in `detail`.
            problem = {"type": "value_error", "loc": ["body"], "msg": message}
            return JSONResponse(error_body(message, [problem]), status_code=422)
        return JSONResponse(error_body(message), status_code=status, headers=exc.headers)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


def key_not_found(key: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"key {key!r} not found")


def value_too_large(size: int, limit: int) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"value is {size} bytes encoded as JSON; the limit is {limit} (MAX_VALUE_BYTES)",
    )


def read_router(store: VersionedStore, role: Role, term: Callable[[], int]) -> APIRouter:
    """`GET /keys/{key}`, `GET /keys` and `GET /state`, served by every node from its own store."""
    router = APIRouter(tags=["reads"])

    @router.get("/keys", response_model=KeyList, summary="List the live keys, sorted")
    async def list_keys() -> KeyList:
        keys = store.keys()
        return KeyList(keys=keys, count=len(keys))

    @router.get(
        "/keys/{key:path}",
        response_model=KeyValue,
        responses=NOT_FOUND,
        summary="Read one key",
    )
    async def read_key(key: KeyPath) -> KeyValue:
        entry = store.get(key)
        if entry is None:
            raise key_not_found(key)
        return KeyValue(key=entry.key, value=entry.value, version=entry.version)

    @router.get(
        "/state",
        response_model=StateResponse,
        summary="This node's whole store, for consistency checks",
    )
    async def state() -> StateResponse:
        live = store.live_items()
        return StateResponse(
            role=role,
            store={entry.key: entry.value for entry in live},
            versions={entry.key: entry.version for entry in live},
            last_version=store.last_version,
            term=term(),
        )

    return router
