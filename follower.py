"""A follower: applies the leader's entries if they are newer, and serves reads.

Run it with `python -m uvicorn follower:app --port 8001`. Clients may read from
any follower; writes go to the leader, and a follower refuses them with 403.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Response
from fastapi.responses import JSONResponse

from kv.core.records import Entry
from kv.follower.node import FollowerCore, Refused
from kv.settings import FollowerSettings, configure_logging, load_settings
from kv.storage.log import Storage
from kv.web.auth import SECRET_HEADER, RequireSecret
from kv.web.errors import install_error_handlers
from kv.web.limits import RejectLargeBodies
from kv.web.reads import KeyPath, read_router
from kv.web.schemas import (
    ErrorResponse,
    FollowerConfig,
    FollowerEntries,
    HealthResponse,
    NodeInfo,
    ReadyResponse,
    ReplicatedEntry,
    ReplicateRequest,
    ReplicateResponse,
    TermConflict,
)

PAGE_LIMIT_DEFAULT = 10_000
PAGE_LIMIT_MAX = 100_000

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
    core = FollowerCore(storage.store)
    store, fence = core.store, core.fence
    # One batch holds at most 4 MiB of entries, or a single larger entry.
    body_limit = 4 * 1024 * 1024 + settings.max_body_bytes

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        storage.open()
        fence.term, fence.leader_id = storage.load_term()
        log.info(
            "follower %s ready; leader is %s",
            core.node_id[:8],
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
    app.include_router(read_router(store, "follower", lambda: fence.term))

    app.add_middleware(
        RequireSecret,
        secret=settings.replication_secret,
        paths=frozenset({"/replicate", "/replicate/entries"}),
    )

    @app.post(
        "/replicate",
        response_model=ReplicateResponse,
        responses={
            401: {"model": ErrorResponse, "description": "Missing or wrong secret."},
            409: {"model": TermConflict, "description": "The batch comes from an older term."},
        },
        # The header is checked by RequireSecret, before routing; documented here.
        openapi_extra={"parameters": [SECRET_PARAMETER]},
        tags=["internal"],
    )
    async def replicate(body: ReplicateRequest) -> Response:
        """Apply a batch of the leader's entries, each only if newer than what is held.

        Refused (409) if it comes from a term older than the newest this follower has
        seen. Each entry is confirmed only if the follower then holds that very write
        or a newer one; a repeat is harmless.
        """
        entries = [Entry(e.key, e.value, e.version, e.deleted) for e in body.entries]
        outcome = core.handle_replicate(body.term, body.leader_id, entries)
        if isinstance(outcome, Refused):
            return refused(outcome)
        if outcome.term_changed:
            storage.save_term(fence.term, fence.leader_id)
            log.info("now in term %d (leader %s)", fence.term, (fence.leader_id or "?")[:8])
        storage.record(outcome.applied)
        if storage.waits_for_fsync:
            await storage.sync()  # APPENDFSYNC=always: confirmed only once on disk
        confirmation = ReplicateResponse(
            applied=len(outcome.applied),
            stale=outcome.stale,
            last_version=store.last_version,
            term=fence.term,
            node_id=core.node_id,
            unconfirmed=outcome.unconfirmed,
        )
        # Serialised directly: the model is already valid, so FastAPI need not check it again.
        return Response(confirmation.model_dump_json(), media_type="application/json")

    @app.get(
        "/replicate/entries",
        response_model=FollowerEntries,
        responses={
            401: {"model": ErrorResponse, "description": "Missing or wrong secret."},
            409: {"model": TermConflict, "description": "The reader's term is older."},
        },
        openapi_extra={"parameters": [SECRET_PARAMETER]},
        tags=["internal"],
    )
    async def entries(
        after_version: Annotated[int, Query(ge=0, description="Entries above this version.")] = 0,
        limit: Annotated[
            int, Query(ge=1, le=PAGE_LIMIT_MAX, description="At most this many entries.")
        ] = PAGE_LIMIT_DEFAULT,
        term: Annotated[
            int | None, Query(ge=1, description="The reading leader's term, if it has begun one.")
        ] = None,
        leader_id: Annotated[str | None, Query(description="The reading leader.")] = None,
    ) -> Response:
        """The entries this follower holds, tombstones included, one page at a time.

        A starting leader reads these, page by page in version order, to get back
        what it acknowledged; it also reads a follower that comes back late. A read
        that names its leader fences first: batches from older terms, and from other
        leaders of the current term, are refused from then on (409 if the reader's own
        term is the older one).
        """
        read = core.handle_read(after_version, limit, term, leader_id)
        if isinstance(read, Refused):
            return refused(read)
        if read.term_changed:
            storage.save_term(fence.term, fence.leader_id)
        body = FollowerEntries.model_construct(
            entries=[
                ReplicatedEntry.model_construct(
                    key=e.key, value=e.value, version=e.version, deleted=e.deleted
                )
                for e in read.entries
            ],
            last_version=store.last_version,
            term=fence.term,
            node_id=core.node_id,
            next_after=read.next_after,
        )
        # Built without re-validating: a page can hold a hundred thousand entries.
        return Response(body.model_dump_json(), media_type="application/json")

    def refused(refusal: Refused) -> JSONResponse:
        conflict = TermConflict(
            error=refusal.reason,
            follower_term=refusal.follower_term,
            batch_term=refusal.batch_term,
        )
        return JSONResponse(conflict.model_dump(), status_code=409)

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
        return HealthResponse(role="follower", last_version=store.last_version, term=fence.term)

    @app.get("/ready", response_model=ReadyResponse, tags=["node"])
    async def ready() -> ReadyResponse:
        """A follower is ready once it answers: it applies whatever a leader sends."""
        return ReadyResponse(ready=True, term=fence.term)

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
