"""A follower: applies the leader's entries if they are newer, and serves reads.

Run it with `python -m uvicorn follower:app --port 8001`. Clients may read from
any follower; writes go to the leader, and a follower refuses them with 403.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Response

from api import KeyPath, RejectLargeBodies, install_error_handlers, read_router
from auth import SECRET_HEADER, RequireSecret
from durability import Storage
from schemas import (
    ErrorResponse,
    FollowerConfig,
    FollowerEntries,
    HealthResponse,
    NodeInfo,
    ReplicatedEntry,
    ReplicateRequest,
    ReplicateResponse,
)
from settings import FollowerSettings, configure_logging, load_settings
from store import Entry

log = logging.getLogger("kvstore.follower")

SECRET_PARAMETER = {
    "name": SECRET_HEADER,
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
    "description": "REPLICATION_SECRET, shared by the leader and followers.",
}
REJECTED_WRITE: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "Followers accept no writes."}
}


def create_app(settings: FollowerSettings | None = None) -> FastAPI:
    settings = settings or load_settings(FollowerSettings)
    configure_logging(settings)
    storage = Storage(settings.data_dir, settings.appendfsync)
    store = storage.store
    node_id = uuid.uuid4().hex
    # One batch holds at most 4 MiB of entries, or a single larger entry.
    body_limit = 4 * 1024 * 1024 + settings.max_body_bytes

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        storage.open()
        log.info(
            "follower %s ready; leader is %s",
            node_id[:8],
            settings.leader_url or "not set",
        )
        try:
            yield
        finally:
            await storage.close()

    app = FastAPI(
        title="Replicated KV store: follower",
        summary="Applies the leader's versioned entries and serves reads.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(RejectLargeBodies, limit=body_limit)
    app.include_router(read_router(store, "follower"))

    app.add_middleware(
        RequireSecret,
        secret=settings.replication_secret,
        paths=frozenset({"/replicate", "/replicate/entries"}),
    )

    @app.post(
        "/replicate",
        response_model=ReplicateResponse,
        responses={401: {"model": ErrorResponse, "description": "Missing or wrong secret."}},
        # The header is checked by RequireSecret, before routing; documented here.
        openapi_extra={"parameters": [SECRET_PARAMETER]},
        tags=["internal"],
    )
    async def replicate(body: ReplicateRequest) -> Response:
        """Apply a batch of the leader's entries, each only if newer than what is held.

        Confirmed only once applied (or found stale), so a repeat is harmless.
        """
        entries = [Entry(e.key, e.value, e.version, e.deleted) for e in body.entries]
        result = store.apply_batch(entries)
        storage.record(result.applied)
        if storage.waits_for_fsync:
            await storage.sync()  # APPENDFSYNC=always: confirmed only once on disk
        confirmation = ReplicateResponse(
            applied=len(result.applied),
            stale=result.stale,
            last_version=store.last_version,
            node_id=node_id,
        )
        # Serialised directly: the model is already valid, so FastAPI need not check it again.
        return Response(confirmation.model_dump_json(), media_type="application/json")

    @app.get(
        "/replicate/entries",
        response_model=FollowerEntries,
        responses={401: {"model": ErrorResponse, "description": "Missing or wrong secret."}},
        openapi_extra={"parameters": [SECRET_PARAMETER]},
        tags=["internal"],
    )
    async def entries() -> FollowerEntries:
        """Every entry this follower holds, tombstones included.

        A leader that restarts without its data reads these to rebuild its store.
        """
        return FollowerEntries(
            entries=[
                ReplicatedEntry(key=e.key, value=e.value, version=e.version, deleted=e.deleted)
                for e in store.entries()
            ],
            last_version=store.last_version,
            node_id=node_id,
        )

    def refuse_write() -> HTTPException:
        where = (
            f"the leader at LEADER_URL={settings.leader_url}"
            if settings.leader_url
            else "the leader (LEADER_URL is not set on this follower)"
        )
        return HTTPException(
            403,
            f"this node is a follower and accepts no writes; send writes to {where}",
        )

    @app.post("/keys", responses=REJECTED_WRITE, tags=["writes"], status_code=403)
    async def write_key() -> Any:
        """Refused: writes go to the leader."""
        raise refuse_write()

    @app.put("/keys/{key:path}", responses=REJECTED_WRITE, tags=["writes"], status_code=403)
    async def put_key(key: KeyPath) -> Any:
        """Refused: writes go to the leader."""
        raise refuse_write()

    @app.delete("/keys/{key:path}", responses=REJECTED_WRITE, tags=["writes"], status_code=403)
    async def delete_key(key: KeyPath) -> Any:
        """Refused: writes go to the leader."""
        raise refuse_write()

    @app.get(
        "/health",
        response_model=HealthResponse,
        response_model_exclude_none=True,
        tags=["node"],
    )
    async def health() -> HealthResponse:
        return HealthResponse(role="follower", last_version=store.last_version)

    @app.get("/", response_model=NodeInfo, tags=["node"])
    async def info() -> NodeInfo:
        return NodeInfo(
            role="follower",
            config=FollowerConfig(
                leader_url=settings.leader_url,
                max_value_bytes=settings.max_value_bytes,
                data_dir=str(settings.data_dir) if settings.data_dir else None,
                appendfsync=settings.appendfsync.value,
                development_secret=settings.uses_development_secret,
            ),
        )

    return app


app = create_app()
