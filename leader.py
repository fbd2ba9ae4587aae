"""The leader: accepts writes, versions them, and replicates them to a quorum.

Run it with `python -m uvicorn leader:app --port 8000`; configuration comes
from the environment (see settings.py and the README).

A write is handled in three steps:

1. assign the next version and apply it locally, in one synchronous call, so
   no other write can come between the two;
2. hand the entry to every follower's delivery loop, getting one future each;
3. wait until `w` of those futures have confirmed, or the timeout passes.
   Deliveries still outstanding finish in the background either way.
"""

import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse, Response

from api import (
    NOT_FOUND,
    KeyPath,
    RejectLargeBodies,
    install_error_handlers,
    key_not_found,
    read_router,
    value_too_large,
)
from durability import Storage
from progress import Confirmation, FollowerProgress
from replication import DelayModel
from replicator import Delivery, FollowerLink, QuorumOutcome, Replicator, follower_client
from schemas import (
    DeliveryReport,
    ErrorResponse,
    FollowerStatus,
    HealthResponse,
    LeaderConfig,
    NodeInfo,
    QuorumError,
    ValueRequest,
    WriteRequest,
    WriteResponse,
)
from settings import LeaderSettings, configure_logging, load_settings
from store import Entry, encode_json

log = logging.getLogger("kvstore.leader")

ClientFactory = Callable[[str], httpx.AsyncClient]
MAX_IN_FLIGHT_PER_FOLLOWER = 1


def create_app(
    settings: LeaderSettings | None = None,
    *,
    client_factory: ClientFactory | None = None,
    rng: random.Random | None = None,
) -> FastAPI:
    """Build a leader app. Tests pass `client_factory` to reach followers in-process."""
    settings = settings or load_settings(LeaderSettings)
    configure_logging(settings)
    storage = Storage(settings.data_dir, settings.appendfsync)
    store = storage.store
    delays = DelayModel(settings.min_delay_ms, settings.max_delay_ms, rng or random.Random())
    make_client = client_factory or (
        lambda url: follower_client(url, settings.replication_secret, MAX_IN_FLIGHT_PER_FOLLOWER)
    )
    replicator = Replicator([])
    n = len(settings.followers)

    def observe(confirmation: Confirmation) -> None:
        # A follower that saw versions this leader never assigned (they were lost with
        # a previous leader's memory) must not see them assigned again.
        store.advance_to(confirmation.last_version)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        storage.open()
        replicator.links = [
            FollowerLink(
                url,
                make_client(url),
                delays,
                FollowerProgress(store.entries, settings.max_replication_queue),
                max_in_flight=MAX_IN_FLIGHT_PER_FOLLOWER,
                on_confirmation=observe,
            )
            for url in settings.followers
        ]
        await rebuild_from_followers()
        replicator.start()
        if settings.write_quorum is None and n < 3:
            log.warning("WRITE_QUORUM is not set; with %d follower(s) it defaults to %d", n, n)
        log.info(
            "leader replicating to %d follower(s), write quorum %d, delay %g..%g ms",
            n,
            settings.quorum,
            settings.min_delay_ms,
            settings.max_delay_ms,
        )
        try:
            yield
        finally:
            await replicator.close()
            await storage.close()

    async def rebuild_from_followers() -> None:
        """Take any newer entry the followers hold: the newest version of each key wins.

        Without DATA_DIR this is how a restarted leader gets its data back; with it, it
        recovers what an fsync policy other than `always` lost in a crash.
        """
        if not replicator.links:
            return
        entries, last_version, reached = await replicator.gather_entries()
        newer = store.apply_batch(entries).applied
        store.advance_to(last_version)
        storage.record(newer)
        log.info(
            "start-up: took %d newer entries from %d of %d followers; next version is %d",
            len(newer),
            reached,
            n,
            store.last_version + 1,
        )

    app = FastAPI(
        title="Replicated KV store: leader",
        summary="Accepts writes, versions them and replicates them to a quorum of followers.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(RejectLargeBodies, limit=settings.max_body_bytes)
    app.include_router(read_router(store, "leader"))

    Quorum = Annotated[
        int | None,
        Query(
            ge=0,
            le=n,
            description=f"Followers that must confirm (0..{n}); default WRITE_QUORUM.",
        ),
    ]
    TimeoutMs = Annotated[
        float | None,
        Query(gt=0, le=3_600_000, description="How long to wait for the quorum, in ms."),
    ]
    write_responses: dict[int | str, dict[str, Any]] = {
        413: {
            "model": ErrorResponse,
            "description": "The value is larger than MAX_VALUE_BYTES.",
        },
        503: {
            "model": QuorumError,
            "description": "Too few followers confirmed in time.",
        },
    }

    def encode_value(value: Any) -> str:
        try:
            value_json = encode_json(value)
        except ValueError:
            raise HTTPException(422, "value must be plain JSON: NaN and Infinity are not") from None
        size = len(value_json.encode())
        if size > settings.max_value_bytes:
            raise value_too_large(size, settings.max_value_bytes)
        return value_json

    async def replicate(
        entry: Entry, started_at: float, w: int | None, timeout_ms: float | None
    ) -> Any:
        required = settings.quorum if w is None else w
        timeout = (timeout_ms or settings.replication_timeout_ms) / 1000
        futures = replicator.broadcast(entry, started_at)
        if storage.waits_for_fsync:
            await storage.sync()  # APPENDFSYNC=always: on disk before it is acknowledged
        reachable = replicator.confirmable()
        if reachable < required:
            timeout = 0  # fail fast: waiting cannot make down followers confirm
        outcome = await replicator.wait_for_quorum(futures, required, timeout)
        return respond(entry, outcome, started_at, reachable)

    def respond(
        entry: Entry, outcome: QuorumOutcome, started_at: float, reachable: int
    ) -> Response:
        latency_ms = round((time.monotonic() - started_at) * 1000, 3)
        reports = [delivery_report(d) for d in outcome.deliveries]
        if not outcome.reached:
            why = (
                f"only {reachable} of {n} followers are reachable"
                if reachable < outcome.required
                else "not in time"
            )
            message = (
                f"write quorum not reached: {outcome.acks} of {outcome.required} required "
                f"follower(s) confirmed ({why}); the write is applied on the leader as version "
                f"{entry.version} and replication to the rest continues in the background"
            )
            body = QuorumError(
                error=message,
                key=entry.key,
                version=entry.version,
                acks=outcome.acks,
                write_quorum=outcome.required,
                latency_ms=latency_ms,
                replication=[DeliveryReport(**report) for report in reports],
            )
            return JSONResponse(body.model_dump(), status_code=503)
        # A WriteResponse, built by hand on the hot path: the entry's cached JSON already
        # holds key, value, version and deleted, so the value is not encoded a second time.
        rest = {
            "acks": outcome.acks,
            "write_quorum": outcome.required,
            "latency_ms": latency_ms,
            "replication": reports,
        }
        content = entry.encoded[:-1] + b"," + encode_json(rest)[1:].encode()
        return Response(content, media_type="application/json")

    async def put(key: str, value: Any, w: int | None, timeout_ms: float | None) -> Any:
        started_at = time.monotonic()
        value_json = encode_value(value)
        entry = store.put(key, value, value_json)  # version and apply, with no await between
        storage.record([entry])
        return await replicate(entry, started_at, w, timeout_ms)

    @app.post(
        "/keys",
        response_model=WriteResponse,
        responses=write_responses,
        tags=["writes"],
    )
    async def write_key(body: WriteRequest, w: Quorum = None, timeout_ms: TimeoutMs = None) -> Any:
        """Write a key and wait for `w` followers to confirm it."""
        return await put(body.key, body.value, w, timeout_ms)

    @app.put(
        "/keys/{key:path}",
        response_model=WriteResponse,
        responses=write_responses,
        tags=["writes"],
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
        entry = store.delete(key)
        if entry is None:
            raise key_not_found(key)
        storage.record([entry])
        return await replicate(entry, started_at, w, timeout_ms)

    @app.get(
        "/health",
        response_model=HealthResponse,
        response_model_exclude_none=True,
        tags=["node"],
    )
    async def health() -> HealthResponse:
        return HealthResponse(
            role="leader",
            last_version=store.last_version,
            followers=n,
            write_quorum=settings.quorum,
            replicas=[
                FollowerStatus(
                    url=link.url,
                    state=link.state.value,
                    lag=max(0, store.last_version - link.progress.follower_last_version),
                    pending=link.progress.backlog + link.progress.snapshot_outstanding,
                    delivered=link.progress.delivered,
                    batches=link.progress.batches,
                    resyncs=link.progress.resyncs,
                    last_error=link.progress.last_error,
                )
                for link in replicator.links
            ],
        )

    @app.get("/", response_model=NodeInfo, tags=["node"])
    async def info() -> NodeInfo:
        return NodeInfo(
            role="leader",
            config=LeaderConfig(
                followers=settings.followers,
                write_quorum=settings.quorum,
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
    return {
        "follower": delivery.follower,
        "ok": delivery.ok,
        "delay_ms": delivery.delay_ms,
        "latency_ms": delivery.latency_ms,
        "attempts": delivery.attempts,
    }


app = create_app()
