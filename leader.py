"""The leader: accepts writes, versions them, and replicates them to a quorum.

Run it with `python -m uvicorn leader:app --port 8000`; configuration comes
from the environment (see settings.py and the README).

A write is handled in three steps:

1. assign the next version and apply it locally, in one synchronous call, so
   no other write can come between the two (:class:`leader_node.LeaderNode`);
2. hand the entry to every follower's delivery loop, getting one future each;
3. wait until `w` of those futures have confirmed, or the timeout passes
   (:func:`wait_for_quorum`). Deliveries still outstanding finish in the
   background either way: they are never cancelled.

Before its first write a starting leader reads the entries of STARTUP_QUORUM
followers; until then `/ready` and writes answer 503, and reads are served.
"""

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, Response

from kv.core.records import Entry, encode_json
from kv.leader.service import ClientFactory, LeaderNode
from kv.network.delivery import OVERFLOWED, Delivery, QuorumOutcome
from kv.settings import LeaderSettings, configure_logging, load_settings
from kv.web.errors import install_error_handlers, key_not_found, value_too_large
from kv.web.limits import RejectLargeBodies
from kv.web.reads import NOT_FOUND, KeyPath, read_router
from kv.web.schemas import (
    DeliveryReport,
    ErrorResponse,
    FollowerStatus,
    HealthResponse,
    LeaderConfig,
    NodeInfo,
    QuorumError,
    ReadyResponse,
    ValueRequest,
    WriteRequest,
    WriteResponse,
)

log = logging.getLogger("kvstore.leader")


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


def create_app(
    settings: LeaderSettings | None = None,
    *,
    client_factory: ClientFactory | None = None,
    rng: random.Random | None = None,
) -> FastAPI:
    """Build a leader app. Tests pass `client_factory` to reach followers in-process."""
    settings = settings or load_settings(LeaderSettings)
    configure_logging(settings)
    node = LeaderNode(settings, client_factory=client_factory, rng=rng)
    store = node.store
    n = len(settings.followers)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # One long-lived httpx.AsyncClient per follower, for the life of the process.
        clients = {url: node.make_client(url) for url in settings.followers}
        node.open(clients)
        if settings.write_quorum is None and n < 3:
            log.warning("WRITE_QUORUM is not set; with %d follower(s) it defaults to %d", n, n)
        if settings.data_dir is None and n and 2 * node.startup.quorum <= n:
            log.warning(
                "STARTUP_QUORUM is %d of %d followers and there is no DATA_DIR: if every follower "
                "this leader reads at start-up was away for all of the previous leader's life, it "
                "may reuse that leader's term (see the README); set DATA_DIR, or STARTUP_QUORUM "
                "above %d, to rule that out",
                node.startup.quorum,
                n,
                n // 2,
            )
        log.info(
            "leader replicating to %d follower(s), write quorum %d, startup quorum %s, "
            "delay %g..%g ms",
            n,
            settings.quorum,
            settings.startup_quorum,
            settings.min_delay_ms,
            settings.max_delay_ms,
        )
        try:
            yield
        finally:
            await node.close()

    app = FastAPI(
        title="Replicated KV store: leader",
        summary="Accepts writes, versions them and replicates them to a quorum of followers.",
        lifespan=lifespan,
    )
    app.state.node = node
    install_error_handlers(app)
    app.add_middleware(RejectLargeBodies, limit=settings.max_body_bytes)
    app.include_router(read_router(store, "leader", lambda: node.term))

    Quorum = Annotated[
        int | None,
        Query(
            ge=0, le=n, description=f"Followers that must confirm (0..{n}); default WRITE_QUORUM."
        ),
    ]
    TimeoutMs = Annotated[
        float | None,
        Query(gt=0, le=3_600_000, description="How long to wait for the quorum, in ms."),
    ]
    write_responses: dict[int | str, dict[str, Any]] = {
        413: {"model": ErrorResponse, "description": "The value is larger than MAX_VALUE_BYTES."},
        503: {
            "model": QuorumError,
            "description": "Too few followers confirmed in time, or the leader is starting.",
        },
    }

    def encode_value(value: Any) -> str:
        try:
            value_json = encode_json(value)
        except ValueError:
            raise HTTPException(422, "value must be plain JSON: NaN and Infinity are not") from None
        if (size := len(value_json.encode())) > settings.max_value_bytes:
            raise value_too_large(size, settings.max_value_bytes)
        return value_json

    def check_ready() -> None:
        if (reason := node.waiting_reason()) is not None:
            raise HTTPException(503, reason)

    async def replicate(
        entry: Entry, started_at: float, w: int | None, timeout_ms: float | None
    ) -> Response:
        required = settings.quorum if w is None else w
        timeout = (timeout_ms or settings.replication_timeout_ms) / 1000
        futures = node.replicate(entry, started_at)
        if node.storage.waits_for_fsync:
            await node.storage.sync()  # APPENDFSYNC=always: on disk before it is acknowledged
        reachable = node.replicator.confirmable()
        if reachable < required:
            timeout = 0  # fail fast: waiting cannot make down followers confirm
        outcome = await wait_for_quorum(futures, required, timeout)
        return respond(entry, outcome, started_at, reachable)

    def respond(
        entry: Entry, outcome: QuorumOutcome, started_at: float, reachable: int
    ) -> Response:
        latency_ms = round((time.monotonic() - started_at) * 1000, 3)
        reports = [delivery_report(d) for d in outcome.deliveries]
        if not outcome.reached:
            overflowed = sum(1 for d in outcome.deliveries if d.error == OVERFLOWED)
            if overflowed:
                why = (
                    f"{overflowed} follower(s) had failed to take MAX_REPLICATION_QUEUE="
                    f"{settings.max_replication_queue} entries, so their queue was replaced by "
                    "a snapshot resync"
                )
            elif reachable < outcome.required:
                why = f"only {reachable} of {n} followers are reachable"
            else:
                why = "not in time"
            message = (
                f"write quorum not reached: {outcome.acks} of {outcome.required} required "
                f"follower(s) confirmed ({why}); the write is applied on the leader as version "
                f"{entry.version} and replication to the rest continues in the background"
            )
            body = QuorumError(
                error=message,
                key=entry.key,
                version=entry.version,
                term=node.term,
                acks=outcome.acks,
                write_quorum=outcome.required,
                latency_ms=latency_ms,
                replication=[DeliveryReport(**report) for report in reports],
            )
            return JSONResponse(body.model_dump(), status_code=503)
        # A WriteResponse, built by hand on the hot path: the entry's cached JSON already
        # holds key, value, version and deleted, so the value is not encoded a second time.
        rest = {
            "term": node.term,
            "acks": outcome.acks,
            "write_quorum": outcome.required,
            "latency_ms": latency_ms,
            "replication": reports,
        }
        content = entry.encoded[:-1] + b"," + encode_json(rest)[1:].encode()
        return Response(content, media_type="application/json")

    async def put(key: str, value: Any, w: int | None, timeout_ms: float | None) -> Response:
        started_at = time.monotonic()
        check_ready()
        entry = node.put(key, value, encode_value(value))
        return await replicate(entry, started_at, w, timeout_ms)

    @app.post("/keys", response_model=WriteResponse, responses=write_responses, tags=["writes"])
    async def write_key(body: WriteRequest, w: Quorum = None, timeout_ms: TimeoutMs = None) -> Any:
        """Write a key and wait for `w` followers to confirm it."""
        return await put(body.key, body.value, w, timeout_ms)

    @app.put(
        "/keys/{key:path}", response_model=WriteResponse, responses=write_responses, tags=["writes"]
    )
    async def put_key(
        key: KeyPath, body: ValueRequest, w: Quorum = None, timeout_ms: TimeoutMs = None
    ) -> Any:
        """Write the key named in the path; the same as `POST /keys`."""
        return await put(key, body.value, w, timeout_ms)

    @app.delete(
        "/keys/{key:path}",
        response_model=WriteResponse,
        responses={**NOT_FOUND, **write_responses},
        tags=["writes"],
    )
    async def delete_key(key: KeyPath, w: Quorum = None, timeout_ms: TimeoutMs = None) -> Any:
        """Delete a key: a versioned tombstone, replicated like a write."""
        started_at = time.monotonic()
        check_ready()
        entry = node.delete(key)
        if entry is None:
            raise key_not_found(key)
        return await replicate(entry, started_at, w, timeout_ms)

    @app.get(
        "/health", response_model=HealthResponse, response_model_exclude_none=True, tags=["node"]
    )
    async def health() -> HealthResponse:
        """Liveness: 200 while the process answers; each follower's state as the leader sees it."""
        now = time.monotonic()
        return HealthResponse(
            role="leader",
            last_version=store.last_version,
            term=node.term,
            followers=n,
            write_quorum=settings.quorum,
            replicas=[
                FollowerStatus(
                    url=link.url,
                    state=link.state.value,
                    lag=max(0, store.last_version - link.progress.follower_last_version),
                    pending=link.progress.pending,
                    backlog=link.progress.backlog(now),
                    delivered=link.progress.delivered,
                    batches=link.progress.batches,
                    heartbeats=link.progress.heartbeats,
                    resyncs=link.progress.resyncs,
                    pulls=link.progress.pulls,
                    last_error=link.progress.last_error,
                )
                for link in node.replicator.links
            ],
        )

    @app.get(
        "/ready",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "Still starting."}},
        tags=["node"],
    )
    async def ready() -> JSONResponse:
        """Readiness: 200 once the start-up read quorum has been merged and writes are taken."""
        body = ReadyResponse(
            ready=node.ready,
            reason=node.waiting_reason(),
            term=node.term,
            heard_from=node.startup.heard,
            startup_quorum=node.startup.quorum,
            followers=n,
            ready_after_s=node.ready_after_s,
        )
        return JSONResponse(body.model_dump(), status_code=200 if node.ready else 503)

    @app.get("/", response_model=NodeInfo, tags=["node"])
    async def info() -> NodeInfo:
        return NodeInfo(
            role="leader",
            config=LeaderConfig(
                followers=settings.followers,
                write_quorum=settings.quorum,
                startup_quorum=node.startup.quorum,
                min_delay_ms=settings.min_delay_ms,
                max_delay_ms=settings.max_delay_ms,
                replication_timeout_ms=settings.replication_timeout_ms,
                max_replication_queue=settings.max_replication_queue,
                max_value_bytes=settings.max_value_bytes,
                data_dir=str(settings.data_dir) if settings.data_dir else None,
                appendfsync=settings.appendfsync.value,
                development_secret=settings.uses_development_secret,
            ),
        )

    return app


def delivery_report(delivery: Delivery) -> dict[str, Any]:
    report = {
        "follower": delivery.follower,
        "ok": delivery.ok,
        "delay_ms": delivery.delay_ms,
        "latency_ms": delivery.latency_ms,
        "attempts": delivery.attempts,
    }
    if delivery.error is not None:
        report["error"] = delivery.error
    return report


app = create_app()
