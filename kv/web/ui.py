"""`GET /ui`: a live page of the cluster, served by the leader with nothing from outside.

The page (kv/web/ui/) listens to two Server-Sent Event streams and polls nothing:
`GET /watch` (the change feed) for writes as the leader applies them, and
`GET /ui/api/events` for the leader's view once a second, and at once when a follower
changes state (each follower's state, lag, pending entries and heartbeat round trip; term,
version, latency by quorum), plus every confirmation as a follower sends it.
`EventSource` reconnects by itself when the leader restarts. Reads from a follower go
through `GET /ui/api/read`, so the page never needs another origin.

On HA nodes (kv/ha) every node serves the page, followers too, and each state event
carries the node's view of the election (`GET /ha`): who leads, the term, the lease's
remaining time, and each change of leader as the node sees it, so a page open on a
follower shows a failover as it happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from kv.core.records import Entry
from kv.follower.service import FollowerService
from kv.leader.service import LeaderNode
from kv.network.delivery import Delivery
from kv.web.access import presented_token
from kv.web.consistency import LAST_VERSION_HEADER, MAX_WAIT_MS
from kv.web.status import leader_health
from kv.web.watch import sse_event

ASSETS = Path(__file__).with_name("ui")
TYPES = {"app.js": "text/javascript", "style.css": "text/css"}
STATE_CHECK_S = 0.25
PENDING_DELIVERIES = 1_000
"""Confirmations buffered for one page; a page that falls further behind skips some."""


def node_of(request: Request) -> LeaderNode | FollowerService:
    return request.app.state.node  # type: ignore[no-any-return]


def election_of(request: Request) -> Callable[[], dict[str, Any]] | None:
    """The HA node's status (`GET /ha`), where the app runs on one."""
    return getattr(request.app.state, "ha_status", None)


def snapshot(
    node: LeaderNode | FollowerService, election: Callable[[], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """What the page shows once a second: no secret, nothing the API does not show."""
    ha = {} if election is None else {"ha": election()}
    if isinstance(node, FollowerService):
        return {
            "role": "follower",
            "node_name": node.settings.name,
            "term": node.term,
            "last_version": node.store.last_version,
            "write_quorum": None,
            "ready": False,
            "leader_url": node.leader_url,
            "followers": [],
            "latency_by_quorum": {},
            **ha,
        }
    health = leader_health(node).model_dump(exclude_none=True)
    latency = {
        str(quorum): {
            "count": histogram.count,
            "mean_ms": round(1000 * histogram.total / histogram.count, 2),
        }
        for quorum, histogram in sorted(node.write_stats.latency_by_quorum.items())
        if histogram.count
    }
    return {
        "role": "leader",
        "node_name": node.settings.name,
        "term": health["term"],
        "last_version": health["last_version"],
        "write_quorum": health["write_quorum"],
        "ready": node.unready_reason() is None,
        "followers": [
            {
                "index": i,
                "url": r["url"],
                "state": r["state"],
                "lag": r["lag"],
                "pending": r["pending"],
                "heartbeat_rtt_ms": r.get("heartbeat_rtt_ms"),
                "last_error": r.get("last_error"),
            }
            for i, r in enumerate(health["replicas"])
        ],
        "latency_by_quorum": latency,
        **ha,
    }


def states(snapshot: dict[str, Any]) -> list[Any]:
    """What, when it changes, is sent at once: followers' states, and who leads."""
    ha = snapshot.get("ha") or {}
    election = [ha.get("leader_name"), ha.get("term"), len(ha.get("elections", ()))]
    return [*(follower["state"] for follower in snapshot["followers"]), *election]


router = APIRouter(prefix="/ui", tags=["ui"])


@router.get("", response_class=HTMLResponse, summary="The live cluster page")
async def page() -> HTMLResponse:
    return HTMLResponse((ASSETS / "index.html").read_text())


@router.get("/{name}", summary="The page's script and style", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in TYPES:
        raise HTTPException(404, f"no such file: {name}")
    return Response((ASSETS / name).read_bytes(), media_type=TYPES[name])


@router.get(
    "/api/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="The page's stream: the leader's state each second, and every confirmation",
)
async def events(request: Request) -> StreamingResponse:
    node = node_of(request)
    election = election_of(request)
    # On an HA node the role can change under the stream: it then ends, and the page's
    # EventSource reconnects (retry: 1000) to the app of the node's new role.
    current: Callable[[], object] | None = getattr(request.app.state, "role_node", None)
    # A follower (HA) sends its state and the election's; only a leader has confirmations.
    watchers = node.delivery_watchers if isinstance(node, LeaderNode) else []

    async def stream() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[tuple[Delivery, Entry]] = asyncio.Queue(PENDING_DELIVERIES)

        def watcher(delivery: Delivery, entry: Entry) -> None:
            if not queue.full():
                queue.put_nowait((delivery, entry))

        watchers.append(watcher)
        try:
            yield b"retry: 1000\n\n"
            loop = asyncio.get_running_loop()
            sent: dict[str, Any] | None = None
            sent_at = next_check = loop.time()
            while True:
                now = loop.time()
                if current is not None and current() is not node:
                    return
                if now >= next_check:
                    # Checked four times a second on the server, sent once a second, or at
                    # once when a follower changes state: a card turns `down` without delay.
                    state = snapshot(node, election)
                    if sent is None or now - sent_at >= 1.0 or states(state) != states(sent):
                        yield sse_event("state", state)
                        sent, sent_at = state, now
                    next_check = now + STATE_CHECK_S
                try:
                    async with asyncio.timeout(max(0.0, next_check - loop.time())):
                        delivery, entry = await queue.get()
                except TimeoutError:
                    continue
                yield sse_event(
                    "delivery",
                    {
                        "follower": delivery.follower,
                        "key": entry.key,
                        "version": entry.version,
                        "deleted": entry.deleted,
                        "ok": delivery.ok,
                        "delay_ms": delivery.delay_ms,
                        "latency_ms": delivery.latency_ms,
                    },
                )
        finally:
            watchers.remove(watcher)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/api/read", summary="Read a key from one node, for the page's read form")
async def read(
    request: Request,
    key: Annotated[str, Query(min_length=1, max_length=1024)],
    node: Annotated[int, Query(ge=-1, description="-1: the leader; 0..N-1: a follower.")] = -1,
    min_version: Annotated[int | None, Query(ge=0)] = None,
    wait_ms: Annotated[float, Query(ge=0, le=MAX_WAIT_MS)] = 0,
) -> dict[str, Any]:
    leader = node_of(request)
    followers = leader.settings.followers if isinstance(leader, LeaderNode) else []
    if node >= len(followers):
        raise HTTPException(422, f"node must be -1 (the leader) or 0..{len(followers) - 1}")
    if node < 0:
        # The leader answers from its own store: the URL the browser used may not be one
        # the leader can reach itself by (a published container port).
        entry = leader.store.get(key)
        found: dict[str, Any] = (
            {"key": entry.key, "value": entry.value, "version": entry.version}
            if entry is not None
            else {"error": f"key {key!r} not found"}
        )
        return {
            "node": "the leader" if isinstance(leader, LeaderNode) else "this node",
            "status": 200 if entry is not None else 404,
            "body": found,
            "last_version": str(leader.applied_through),
        }
    base = followers[node]
    params: dict[str, Any] = {"wait_ms": wait_ms}
    if min_version is not None:
        params["min_version"] = min_version
    client: httpx.AsyncClient = request.app.state.ui_client
    try:
        # The follower checks the same token (AUTH_FILE), which may have come in a cookie.
        token = presented_token(request.scope)
        headers = {} if token is None else {"Authorization": f"Bearer {token.decode('latin-1')}"}
        response = await client.get(
            f"{base}/keys/{quote(key, safe='')}", params=params, headers=headers
        )
    except httpx.HTTPError as error:
        return {"node": base, "status": None, "error": f"{type(error).__name__}: {error}"}
    return {
        "node": base,
        "status": response.status_code,
        "body": response.json(),
        "last_version": response.headers.get(LAST_VERSION_HEADER),
    }
