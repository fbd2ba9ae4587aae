"""The read routes every node serves from its own store: `GET /keys/{key}`, `/keys`, `/state`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse
from starlette.convertors import PathConvertor, register_url_convertor

from kv.core.store import VersionedStore
from kv.web.schemas import (
    MAX_KEY_LENGTH,
    ErrorResponse,
    KeyList,
    KeyNotFound,
    KeyValue,
    Role,
    StateResponse,
)


class KeyConvertor(PathConvertor):
    """Starlette's `path` convertor, matching newlines too: its `.*` stops at one, so a key
    written with `POST /keys` that holds a newline could be neither read nor deleted by path."""

    regex = "[\\s\\S]*"


register_url_convertor("key", KeyConvertor())
KEY_ROUTE = "/keys/{key:key}"
"""The route of one key, on both roles: any string, URL-encoded, `/` and newlines included."""

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


def not_found_here(key: str, role: Role, last_version: int) -> JSONResponse:
    """404, with the node's last_version: on a follower, absent may only mean "not yet"."""
    message = f"key {key!r} not found"
    if role == "follower":
        message += (
            f" on this follower, which holds versions up to {last_version}; a follower applies "
            "a write after the leader acknowledged it, so it may not have it yet: read from "
            "the leader, or retry"
        )
    body = KeyNotFound(error=message, last_version=last_version)
    return JSONResponse(body.model_dump(), status_code=404)


def read_router(store: VersionedStore, role: Role, term: Callable[[], int]) -> APIRouter:
    """`GET /keys/{key}`, `GET /keys` and `GET /state`, served by every node from its own store."""
    router = APIRouter(tags=["reads"])

    @router.get("/keys", response_model=KeyList, summary="List the live keys, sorted")
    async def list_keys() -> KeyList:
        keys = store.keys()
        return KeyList(keys=keys, count=len(keys))

    @router.get(
        KEY_ROUTE,
        response_model=KeyValue,
        responses={404: {"model": KeyNotFound, "description": "Absent or deleted, on this node."}},
        summary="Read one key",
    )
    async def read_key(key: KeyPath) -> Any:
        entry = store.get(key)
        if entry is None:
            return not_found_here(key, role, store.last_version)
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
