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

from api import KeyPath, install_error_handlers, read_router
from auth import SECRET_HEADER, RequireSecret
from schemas import (
    ErrorResponse,
    FollowerConfig,
    HealthResponse,
    NodeInfo,
    ReplicateRequest,
    ReplicateResponse,
)
from settings import FollowerSettings, configure_logging, load_settings
from store import Entry, VersionedStore

log = logging.getLogger("kvstore.follower")

REJECTED_WRITE: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "Followers accept no writes."}
}


def create_app(settings: FollowerSettings | None = None) -> FastAPI:
    settings = settings or load_settings(FollowerSettings)
    configure_logging(settings)
    store = VersionedStore()
    node_id = uuid.uuid4().hex

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.info(
            "follower %s ready; leader is %s",
            node_id[:8],
            settings.leader_url or "not set",
        )
        yield

    app = FastAPI(
        title="Replicated KV store: follower",
        summary="Applies the leader's versioned entries and serves reads.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(read_router(store, "follower"))

    app.add_middleware(
        RequireSecret, secret=settings.replication_secret, paths=frozenset({"/replicate"})
    )

    @app.post(
        "/replicate",
        response_model=ReplicateResponse,
        responses={401: {"model": ErrorResponse, "description": "Missing or wrong secret."}},
        # The header is checked by RequireSecret, before routing; documented here.
        openapi_extra={
            "parameters": [
                {
                    "name": SECRET_HEADER,
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "REPLICATION_SECRET, shared by the leader and followers.",
                }
            ]
        },
        tags=["internal"],
    )
    async def replicate(body: ReplicateRequest) -> Response:
        """Apply a batch of the leader's entries, each only if newer than what is held.

        Confirmed only once applied (or found stale), so a repeat is harmless.
        """
        entries = [Entry(e.key, e.value, e.version, e.deleted) for e in body.entries]
        result = store.apply_batch(entries)
        confirmation = ReplicateResponse(
            applied=result.applied,
            stale=result.stale,
            last_version=store.last_version,
            node_id=node_id,
        )
        # Serialised directly: the model is already valid, so FastAPI need not check it again.
        return Response(confirmation.model_dump_json(), media_type="application/json")

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
                development_secret=settings.uses_development_secret,
            ),
        )

    return app


app = create_app()
