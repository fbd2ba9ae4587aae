"""Error bodies: every error leaves a node as `{"error": "<one sentence>", "detail": ...}`.

With a 4xx status (503 for a missed quorum or a starting leader), so a client
never has to guess what it did wrong.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kv.web.schemas import ErrorResponse


def error_body(message: str, detail: Any = None) -> dict[str, Any]:
    return ErrorResponse(error=message, detail=detail).model_dump()


def error_json(message: str) -> bytes:
    """`error_body` as bytes, for raw middleware that answers before FastAPI."""
    return json.dumps(error_body(message)).encode()


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
        return http_error_response(exc)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    """The JSON answer to an HTTPException, as every route (and the write fast path) gives it."""
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


def key_not_found(key: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"key {key!r} not found")


def value_too_large(size: int, limit: int) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"value is {size} bytes encoded as JSON; the limit is {limit} (MAX_VALUE_BYTES)",
    )
