"""The leader: accepts writes, versions them, and replicates them to a quorum.

Run it with `python -m uvicorn leader:app --port 8000`; configuration comes
from the environment (kv/settings.py, and docs/operations/configuration.md). A write is three steps:

1. assign the next version and apply it locally, in one synchronous call, so
   no other write can come between the two (`node.put`, kv/leader/node.py);
2. hand the entry to every follower's delivery loop, one future each
   (`node.replicate`, kv/network/delivery.py);
3. wait until `w` of those futures have confirmed, or the timeout passes
   (:func:`wait_for_quorum`, below). Deliveries still outstanding finish in the
   background either way: they are never cancelled.

Before its first write a starting leader reads the entries of STARTUP_QUORUM
followers; until then `/ready` and writes answer 503, and reads are served.

An HA node (`python -m kv.ha`) runs this same app while it leads, built around the
store it kept as a follower; its lease is checked before a write is taken and again
before it is acknowledged (`node.refusal()`).
"""

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client.registry import Collector

from kv.core.records import Entry
from kv.core.requests import RequestTag
from kv.core.stats import WriteFailure
from kv.core.store import VersionMismatch
from kv.leader.node import ANY, Expected, IdempotencyKeyReused, Replay
from kv.leader.service import ClientFactory, LeaderNode
from kv.network.delivery import Delivery, QuorumOutcome
from kv.network.tls import client_context
from kv.settings import LeaderSettings, load_settings
from kv.storage.heap import freeze_startup_heap
from kv.web import status, ui, writes
from kv.web.access import check_key, install_access_control
from kv.web.consistency import MAX_WAIT_MS
from kv.web.errors import install_error_handlers, key_not_found
from kv.web.fastpath import fast_writes
from kv.web.lazy import lazy_app
from kv.web.limits import RejectLargeBodies, raise_open_file_limit
from kv.web.logs import configure_logging, install_access_log
from kv.web.metrics import NO_TELEMETRY, LeaderCollector, metrics_router
from kv.web.reads import KEY_ROUTE, NOT_FOUND, KeyPath, read_router
from kv.web.schemas import (
    HealthResponse,
    NodeInfo,
    PrimaryResponse,
    ReadyResponse,
    ValueRequest,
    WriteRequest,
)
from kv.web.schemas import WriteResponse as Written
from kv.web.watch import watch_router

Quorum = Annotated[
    int | None, Query(ge=0, description="Followers that must confirm; default WRITE_QUORUM.")
]
TimeoutMs = Annotated[
    float | None, Query(gt=0, le=3_600_000, description="How long to wait for the quorum, in ms.")
]


def create_app(
    settings: LeaderSettings | None = None,
    *,
    client_factory: ClientFactory | None = None,
    rng: random.Random | None = None,
    node: LeaderNode | None = None,
    routers: Sequence[APIRouter] = (),
    collectors: Sequence[Collector] = (),
) -> FastAPI:
    """Build a leader app. Tests pass `client_factory` to reach followers in-process; an HA
    node passes the `node` it built (and owns logging), and its own `routers` and metric
    `collectors`."""
    settings = settings or load_settings(LeaderSettings)
    if node is None:
        configure_logging(settings)
        node = LeaderNode(settings, client_factory=client_factory, rng=rng)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One long-lived httpx.AsyncClient per follower, for the life of the process.
        clients = {url: node.make_client(url) for url in settings.followers}
        node.open(clients)
        freeze_startup_heap()
        raise_open_file_limit()  # a thousand idle clients must not use up the files
        # The /ui page's reads from followers (kv/web/ui.py), apart from replication's.
        app.state.ui_client = httpx.AsyncClient(
            timeout=MAX_WAIT_MS / 1000 + 5,
            trust_env=False,
            verify=client_context(settings) or True,
        )
        try:
            yield
        finally:
            await app.state.ui_client.aclose()
            await node.close()

    app = FastAPIOffline(  # /docs and /redoc load their scripts from this node, not a CDN
        title="Replicated KV store: leader",
        summary="Accepts writes, versions them and replicates them to a quorum of followers.",
        lifespan=lifespan,
        telemetry=NO_TELEMETRY,
    )
    app.state.node = node
    install_error_handlers(app)

    async def fast_write(key: str, value: Any, w: int | None, timeout: float | None,
                         idempotency_key: str | None) -> Response:  # fmt: skip
        return await put(node, key, value, w, timeout, idempotency_key=idempotency_key)

    app.add_middleware(fast_writes, write=fast_write)  # innermost: inside the body limit
    app.add_middleware(RejectLargeBodies, limit=settings.max_body_bytes)
    install_access_control(app, settings)  # tokens, before a body is read (AUTH_FILE)
    install_access_log(app, settings.access_log)  # outermost: it sees every answer
    app.include_router(read_router(node, "leader"))
    app.include_router(watch_router(node, settings.watch_max_pending))
    app.include_router(metrics_router(LeaderCollector(node), *collectors))
    app.include_router(router)
    app.include_router(ui.router)
    for extra in routers:
        app.include_router(extra)
    return app


async def wait_for_quorum(
    futures: list[asyncio.Future[Delivery]], required: int, timeout: float
) -> QuorumOutcome:
    """Wait until `required` followers have confirmed, or `timeout` seconds pass.

    The futures are never cancelled: a delivery that misses the quorum still
    completes in its follower's loop, in the background.
    """
    pending = {future for future in futures if not future.done()}
    acks = sum(1 for future in futures if future.done() and future.result().ok)
    deadline = time.monotonic() + timeout
    while acks < required and pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        done, pending = await asyncio.wait(
            pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            break
        acks += sum(1 for future in done if future.result().ok)
    return QuorumOutcome(required, [future.result() for future in futures if future.done()])


async def replicate(
    node: LeaderNode,
    entry: Entry,
    started_at: float,
    w: int | None,
    timeout_ms: float | None,
    replay: Replay | None = None,
) -> Response:
    """Steps 2 and 3 of a write: fan out, wait for the quorum, answer.

    A repeated request (`replay`) confirms its earlier write the same way, and answers
    with that write."""
    settings = node.settings
    required = settings.quorum if w is None else w
    timeout = (timeout_ms or settings.replication_timeout_ms) / 1000
    futures = node.replicate(entry, started_at)
    if node.storage.waits_for_fsync:
        await node.storage.sync()  # APPENDFSYNC=always: on disk before it is acknowledged
    reachable = node.replicator.confirmable()
    if reachable < required:
        timeout = 0  # fail fast: waiting cannot make down followers confirm
    outcome = await wait_for_quorum(futures, required, timeout)
    latency_s = time.monotonic() - started_at
    failure = writes.why_missed(outcome, reachable)
    if failure is None and (lost := node.refusal()) is not None:
        node.write_stats.failed(WriteFailure.STEPPED_DOWN)
        return writes.not_acknowledged(entry, lost)
    if failure is None:
        node.write_stats.acknowledged(required, latency_s)
    else:
        node.write_stats.failed(failure)
    return writes.write_response(
        entry if replay is None else replay.answer,
        outcome,
        term=node.term,
        latency_s=latency_s,
        failure=failure,
        reachable=reachable,
        followers=len(settings.followers),
        max_queue=settings.max_replication_queue,
        replayed=replay is not None,
    )


def ready_node(node: LeaderNode, w: int | None) -> LeaderNode:
    """`node`, if it takes writes now (else 503 saying why) and `w` is in range."""
    writes.check_quorum(w, len(node.settings.followers))
    if (reason := node.waiting_reason()) is not None:
        node.write_stats.failed(WriteFailure.STARTING)
        raise HTTPException(503, reason, headers={"Retry-After": "1"})
    return node


def earlier_write(node: LeaderNode, tag: RequestTag | None, key: str, value: Any) -> Replay | None:
    """The write a repeated Idempotency-Key made before (422 if it was for another request)."""
    if tag is None:
        return None
    try:
        return node.replay(tag, key, value)
    except IdempotencyKeyReused as reused:
        raise HTTPException(422, str(reused)) from None


async def put(
    node: LeaderNode,
    key: str,
    value: Any,
    w: int | None,
    timeout: float | None,
    if_version: Expected = ANY,
    idempotency_key: str | None = None,
) -> Any:
    started_at = time.monotonic()
    ready_node(node, w)
    value_json = writes.encode_value(value, node.settings.max_value_bytes)
    tag = writes.request_tag(idempotency_key, key, False, value_json)
    if (replay := earlier_write(node, tag, key, value)) is not None:
        return await replicate(node, replay.confirm, started_at, w, timeout, replay)
    try:
        entry = node.put(key, value, value_json, if_version, tag)
    except VersionMismatch as mismatch:
        return writes.version_conflict(mismatch)
    return await replicate(node, entry, started_at, w, timeout)


router = APIRouter()


@router.post("/keys", response_model=Written, responses=writes.WRITE_RESPONSES, tags=["writes"])
async def write_key(
    request: Request,
    body: WriteRequest,
    w: Quorum = None,
    timeout_ms: TimeoutMs = None,
    idempotency_key: writes.IdempotencyKey = None,
) -> Any:
    """Write a key and wait for `w` followers to confirm it.

    With an `Idempotency-Key`, a repeat of the request (a retry) is answered with the write
    the first one made, and never written twice."""
    check_key(request.scope, body.key)  # a token limited to prefixes (AUTH_FILE)
    node = request.app.state.node
    return await put(node, body.key, body.value, w, timeout_ms, idempotency_key=idempotency_key)


@router.put(
    KEY_ROUTE,
    response_model=Written,
    responses={**writes.WRITE_RESPONSES, **writes.CONDITIONAL_RESPONSES},
    tags=["writes"],
)
async def put_key(
    request: Request,
    key: KeyPath,
    body: ValueRequest,
    w: Quorum = None,
    timeout_ms: TimeoutMs = None,
    if_version: writes.IfVersion = None,
    if_match: writes.IfMatch = None,
    idempotency_key: writes.IdempotencyKey = None,
) -> Any:
    """Write the key named in the path; the same as `POST /keys`.

    Conditional (compare-and-set) with `If-Match: "<version>"` or `?if_version=`: written
    only if the key is at that version now, else 412 with its current version. A retry
    with the same `Idempotency-Key` gets the first answer's write, not a 412.
    """
    expected = writes.expected_version(if_version, if_match)
    node = request.app.state.node
    return await put(node, key, body.value, w, timeout_ms, expected, idempotency_key)


@router.delete(
    KEY_ROUTE,
    response_model=Written,
    responses={**NOT_FOUND, **writes.WRITE_RESPONSES, **writes.CONDITIONAL_RESPONSES},
    tags=["writes"],
)
async def delete_key(
    request: Request,
    key: KeyPath,
    w: Quorum = None,
    timeout_ms: TimeoutMs = None,
    if_version: writes.IfVersion = None,
    if_match: writes.IfMatch = None,
    idempotency_key: writes.IdempotencyKey = None,
) -> Any:
    """Delete a key: a versioned tombstone, replicated like a write. Conditional with
    `If-Match` or `?if_version=`, and idempotent with `Idempotency-Key`, as for PUT."""
    expected = writes.expected_version(if_version, if_match)
    started_at = time.monotonic()
    node = ready_node(request.app.state.node, w)
    tag = writes.request_tag(idempotency_key, key, True, "null")
    if (replay := earlier_write(node, tag, key, None)) is not None:
        return await replicate(node, replay.confirm, started_at, w, timeout_ms, replay)
    try:
        entry = node.delete(key, expected, tag)
    except VersionMismatch as mismatch:
        return writes.version_conflict(mismatch)
    if entry is None:
        raise key_not_found(key)
    return await replicate(node, entry, started_at, w, timeout_ms)


@router.get(
    "/health", response_model=HealthResponse, response_model_exclude_none=True, tags=["node"]
)
async def health(request: Request) -> HealthResponse:
    """Liveness: 200 while the process answers; each follower's state as the leader sees it."""
    return status.leader_health(request.app.state.node)


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={
        503: {
            "model": ReadyResponse,
            "description": "Still starting, or fewer than WRITE_QUORUM followers reachable.",
        }
    },
    tags=["node"],
)
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when a write at the default quorum can succeed: the start-up read is
    done and at least WRITE_QUORUM followers are reachable. 503 with the reason otherwise.
    Liveness is `/health`."""
    body = status.leader_ready(request.app.state.node)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/primary",
    response_model=PrimaryResponse,
    responses={503: {"model": PrimaryResponse, "description": "Not the primary now."}},
    tags=["node"],
)
async def primary(request: Request) -> JSONResponse:
    """200 while this node leads and takes writes: the check HAProxy sends writes by."""
    node: LeaderNode = request.app.state.node
    return status.primary_answer(node, "leader", node.primary_reason())


@router.get("/", response_model=NodeInfo, tags=["node"])
async def info(request: Request) -> NodeInfo:
    return status.leader_info(request.app.state.node)


__getattr__ = lazy_app(globals(), lambda: create_app())  # `app`, built on first use
