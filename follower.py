"""A follower: applies the leader's entries if they are newer, and serves reads.

Run it with `python -m uvicorn follower:app --port 8001`. Clients may read from
any follower; writes go to the leader, and a follower refuses them with 403. The
rules live in kv/follower/node.py (FollowerCore); these routes only translate HTTP.

An HA node (`python -m kv.ha`) runs this same app while it follows; there a write is
redirected (307) to the elected leader, or answered 503 while none is known.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client.registry import Collector
from starlette.types import Scope

from kv.follower.node import Refused, TermUnknown
from kv.follower.service import FollowerService
from kv.settings import FollowerSettings, load_settings
from kv.storage.heap import freeze_startup_heap
from kv.web import internal, status
from kv.web.access import install_access_control
from kv.web.auth import RequireSecret
from kv.web.errors import install_error_handlers
from kv.web.fastpath import FastJSONPost
from kv.web.lazy import lazy_app
from kv.web.limits import RejectLargeBodies, raise_open_file_limit
from kv.web.logs import configure_logging, install_access_log
from kv.web.metrics import NO_TELEMETRY, FollowerCollector, metrics_router
from kv.web.reads import KEY_ROUTE, KeyPath, read_router
from kv.web.schemas import (
    FollowerEntries,
    HealthResponse,
    NodeInfo,
    PrimaryResponse,
    ReadyResponse,
    ReplicateRequest,
    ReplicateResponse,
)
from kv.web.watch import watch_router

log = logging.getLogger("kvstore.follower")
BATCH_BYTES = 4 * 1024 * 1024  # one batch holds at most 4 MiB of entries, or one larger entry


def create_app(
    settings: FollowerSettings | None = None,
    *,
    node: FollowerService | None = None,
    routers: Sequence[APIRouter] = (),
    collectors: Sequence[Collector] = (),
) -> FastAPI:
    """Build a follower app; an HA node passes the `node` it built (and owns logging), and
    its own `routers` and metric `collectors`."""
    settings = settings or load_settings(FollowerSettings)
    if node is None:
        configure_logging(settings)
        node = FollowerService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        node.open()
        freeze_startup_heap()
        raise_open_file_limit()  # a thousand idle clients must not use up the files
        log.info(
            "follower %s ready; leader is %s",
            node.core.node_id[:8],
            node.leader_url
            or ("not known yet (elected)" if node.election else "not named (LEADER_URL is unset)"),
        )
        try:
            yield
        finally:
            await node.close()

    app = FastAPIOffline(  # /docs and /redoc load their scripts from this node, not a CDN
        title="Replicated KV store: follower",
        summary="Applies the leader's versioned entries and serves reads.",
        lifespan=lifespan,
        telemetry=NO_TELEMETRY,
    )
    app.state.node = node
    install_error_handlers(app)

    async def fast_replicate(body: ReplicateRequest, _: Scope) -> Response:
        return await apply_batch(node, body)

    # Innermost: inside the body limit and the secret check.
    app.add_middleware(
        FastJSONPost, path="/replicate", model=ReplicateRequest, handle=fast_replicate
    )
    app.add_middleware(RejectLargeBodies, limit=BATCH_BYTES + settings.max_body_bytes)
    # Mutual TLS too, when uvicorn asks for client certificates (kv/web/auth.py).
    app.add_middleware(
        RequireSecret,
        secret=settings.replication_secret,
        paths=frozenset({"/replicate", "/replicate/entries"}),
    )
    install_access_control(app, settings)  # tokens, before a body is read (AUTH_FILE)
    install_access_log(app, settings.access_log)  # outermost: it sees every answer
    app.include_router(read_router(node, "follower"))
    app.include_router(watch_router(node, settings.watch_max_pending))
    app.include_router(metrics_router(FollowerCollector(node), *collectors))
    app.include_router(router)
    for extra in routers:
        app.include_router(extra)
    return app


router = APIRouter()


def service(request: Request) -> FollowerService:
    return request.app.state.node  # type: ignore[no-any-return]


@router.post(
    "/replicate",
    response_model=ReplicateResponse,
    responses=internal.REPLICATE_RESPONSES,
    openapi_extra={"parameters": [internal.SECRET_PARAMETER]},
    tags=["internal"],
)
async def replicate(request: Request, body: ReplicateRequest) -> Response:
    """Apply a batch of the leader's entries, each only if newer than what is held.

    Refused (409) if it comes from a term older than the newest this follower has
    seen. Each entry is confirmed only if the follower then holds that very write
    or a newer one; a repeat is harmless.
    """
    return await apply_batch(service(request), body)


async def apply_batch(node: FollowerService, body: ReplicateRequest) -> Response:
    outcome = await node.replicate(
        body.term, body.leader_id, internal.entries_of(body), body.through, body.node_id
    )
    if isinstance(outcome, Refused):
        return internal.refused(outcome)
    if isinstance(outcome, TermUnknown):
        return internal.term_unknown(outcome)
    return internal.confirmation(
        outcome, node.storage.store.last_version, node.term, node.core.node_id
    )


@router.get(
    "/replicate/entries",
    response_model=FollowerEntries,
    responses=internal.ENTRIES_RESPONSES,
    openapi_extra={"parameters": [internal.SECRET_PARAMETER]},
    tags=["internal"],
)
async def entries(
    request: Request,
    after_version: Annotated[int, Query(ge=0, description="Entries above this version.")] = 0,
    limit: Annotated[
        int, Query(ge=1, le=internal.PAGE_LIMIT_MAX, description="At most this many entries.")
    ] = internal.PAGE_LIMIT_DEFAULT,
    term: Annotated[int | None, Query(ge=1, description="The reading leader's term.")] = None,
    leader_id: Annotated[str | None, Query(description="The reading leader.")] = None,
    format: Annotated[
        Literal["json", "lines"],
        Query(
            description="`lines`: the other fields as JSON on the first line, then each entry "
            "on a line of its own (application/x-ndjson), which a starting leader reads "
            "without decoding and encoding every value again."
        ),
    ] = "json",
) -> Response:
    """The entries this follower holds, tombstones included, one page at a time.

    A starting leader reads these, in version order, to get back what it
    acknowledged; it also reads a follower that comes back late. A read that names
    its leader fences first: batches from older terms, and from other leaders of
    the current term, are refused from then on (409 if the reader's term is older).
    """
    node = service(request)
    page = node.read(after_version, limit, term, leader_id)
    if isinstance(page, Refused):
        return internal.refused(page)
    if isinstance(page, TermUnknown):
        return internal.term_unknown(page)
    store, lines = node.storage.store, format == "lines"
    return internal.page_body(page, store.last_version, node.term, node.core.node_id, lines)


@router.post("/keys", responses=internal.REJECTED_WRITE, tags=["writes"], status_code=403)
async def write_key(request: Request) -> Response:
    """Writes go to the leader: 403 naming it (HA: 307 to it, or 503 while none is known)."""
    return internal.write_elsewhere(request, service(request))


@router.put(KEY_ROUTE, responses=internal.REJECTED_WRITE, tags=["writes"], status_code=403)
async def put_key(request: Request, key: KeyPath) -> Response:
    """Writes go to the leader: 403 naming it (HA: 307 to it, or 503 while none is known)."""
    return internal.write_elsewhere(request, service(request))


@router.delete(KEY_ROUTE, responses=internal.REJECTED_WRITE, tags=["writes"], status_code=403)
async def delete_key(request: Request, key: KeyPath) -> Response:
    """Writes go to the leader: 403 naming it (HA: 307 to it, or 503 while none is known)."""
    return internal.write_elsewhere(request, service(request))


@router.get(
    "/health", response_model=HealthResponse, response_model_exclude_none=True, tags=["node"]
)
async def health(request: Request) -> HealthResponse:
    """Liveness: 200 while the process answers."""
    return status.follower_health(service(request))


@router.get(
    "/primary",
    response_model=PrimaryResponse,
    responses={503: {"model": PrimaryResponse, "description": "A follower is never primary."}},
    tags=["node"],
)
async def primary(request: Request) -> JSONResponse:
    """503: a follower takes no writes. HAProxy sends writes to the node answering 200."""
    node = service(request)
    leader = node.leader_name or node.leader_url
    reason = "this node is a follower" + (f"; {leader} leads" if leader else "")
    return status.primary_answer(node, "follower", reason)


@router.get("/ready", response_model=ReadyResponse, tags=["node"])
async def ready(request: Request) -> ReadyResponse:
    """A follower is ready once it answers: it applies whatever a leader sends."""
    return ReadyResponse(ready=True, term=service(request).term)


@router.get("/", response_model=NodeInfo, tags=["node"])
async def info(request: Request) -> NodeInfo:
    return status.follower_info(service(request))


__getattr__ = lazy_app(globals(), lambda: create_app())  # `app`, built on first use
