"""The read routes every node serves from its own store: `GET /keys/{key}`, `/keys`, `/state`.

Each read answers with the node's `X-Last-Version` (its applied_through), and accepts
`?min_version=` / `X-Min-Version` with `?wait_ms=`: see kv/web/consistency.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from starlette.convertors import PathConvertor, register_url_convertor

from kv.web.access import grant_of, visible
from kv.web.consistency import (
    LAST_VERSION_HEADER,
    MinVersionHeader,
    MinVersionQuery,
    ReadableNode,
    WaitMs,
    etag,
    wanted_version,
)
from kv.web.schemas import (
    MAX_KEY_LENGTH,
    ErrorResponse,
    KeyList,
    KeyNotFound,
    KeyValue,
    NotYetApplied,
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
NOT_YET: dict[int | str, dict[str, Any]] = {
    503: {
        "model": NotYetApplied,
        "description": "This node had not applied min_version within wait_ms.",
    }
}


def not_found_here(key: str, role: Role, node: ReadableNode) -> JSONResponse:
    """404, with how far the node has got: on a follower, absent may only mean "not yet"."""
    last_version = node.store.last_version
    message = f"key {key!r} not found"
    if role == "follower":
        message += (
            f" on this follower, which holds versions up to {last_version}; a follower applies "
            "a write after the leader acknowledged it, so it may not have it yet: read from "
            "the leader, retry, or pass ?min_version= with your write's version"
        )
    body = KeyNotFound(
        error=message, last_version=last_version, applied_through=node.applied_through
    )
    return JSONResponse(
        body.model_dump(),
        status_code=404,
        headers={LAST_VERSION_HEADER: str(node.applied_through)},
    )


def not_yet_applied(node: ReadableNode, wanted: int, wait_ms: float) -> JSONResponse:
    body = NotYetApplied(
        error=f"this node has applied every write up to version {node.applied_through}, not "
        f"yet {wanted} (waited {wait_ms:g} ms); retry with a longer ?wait_ms=, read another "
        "node, or read from the leader",
        min_version=wanted,
        last_version=node.applied_through,
        leader=node.leader_url,
    )
    return JSONResponse(
        body.model_dump(),
        status_code=503,
        headers={LAST_VERSION_HEADER: str(node.applied_through)},
    )


def read_router(node: ReadableNode, role: Role) -> APIRouter:
    """`GET /keys/{key}`, `GET /keys` and `GET /state`, served by every node from its own store."""
    router = APIRouter(tags=["reads"])
    store = node.store

    def caught_up(wanted: int) -> bool:
        return node.applied_through >= wanted

    @router.get(
        "/keys",
        response_model=KeyList,
        responses=NOT_YET,
        summary="List the live keys, sorted",
    )
    async def list_keys(
        request: Request,
        response: Response,
        min_version: MinVersionQuery = None,
        wait_ms: WaitMs = 0,
        x_min_version: MinVersionHeader = None,
    ) -> Any:
        wanted = wanted_version(min_version, x_min_version)
        if wanted is not None and not await node.gate.wait_for(
            lambda: caught_up(wanted), wait_ms / 1000
        ):
            return not_yet_applied(node, wanted, wait_ms)
        keys = visible(request, store.keys())  # a token's prefixes (AUTH_FILE)
        response.headers[LAST_VERSION_HEADER] = str(node.applied_through)
        return KeyList(keys=keys, count=len(keys))

    @router.get(
        KEY_ROUTE,
        response_model=KeyValue,
        responses={
            404: {"model": KeyNotFound, "description": "Absent or deleted, on this node."},
            **NOT_YET,
        },
        summary="Read one key",
    )
    async def read_key(
        key: KeyPath,
        response: Response,
        min_version: MinVersionQuery = None,
        wait_ms: WaitMs = 0,
        x_min_version: MinVersionHeader = None,
    ) -> Any:
        """With `min_version`, it is enough that this key holds that version or a newer one
        (your own write, or one that replaced it), even if older writes to other keys are
        still on their way here."""
        wanted = wanted_version(min_version, x_min_version)
        if wanted is not None:

            def ready() -> bool:
                held = store.held(key)
                return caught_up(wanted) or (held is not None and held.version >= wanted)

            if not await node.gate.wait_for(ready, wait_ms / 1000):
                return not_yet_applied(node, wanted, wait_ms)
        entry = store.get(key)
        if entry is None:
            return not_found_here(key, role, node)
        response.headers[LAST_VERSION_HEADER] = str(node.applied_through)
        response.headers["ETag"] = etag(entry.version)
        return KeyValue(key=entry.key, value=entry.value, version=entry.version)

    @router.get(
        "/state",
        response_model=StateResponse,
        summary="This node's whole store, for consistency checks",
    )
    async def state(request: Request) -> StateResponse:
        live = store.live_items()
        if (grant := grant_of(request)) is not None:  # a token's prefixes (AUTH_FILE)
            live = [entry for entry in live if grant.covers(entry.key)]
        return StateResponse(
            role=role,
            store={entry.key: entry.value for entry in live},
            versions={entry.key: entry.version for entry in live},
            last_version=store.last_version,
            applied_through=node.applied_through,
            term=node.term,
        )

    return router
