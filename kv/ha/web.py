"""The HA node's own HTTP: `GET /ha`, its metrics, and the ASGI app that serves the role.

Both role apps include the `/ha` route and the metrics collector, so `/docs` and
`/metrics` are complete whichever role the node holds. :class:`HAApp` is what uvicorn
runs: it starts and stops the node (ASGI lifespan) and hands each request to the app of
the node's current role.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from kv.ha.decide import Role
from kv.ha.node import HANode
from kv.storage.heap import freeze_startup_heap

ETCD_OPERATIONS = ("read", "grant", "campaign", "keepalive", "revoke")


class ElectionRecord(BaseModel):
    at: float = Field(description="Unix time at which this node saw the new leader.")
    term: int
    leader: str
    vacant_s: float | None = Field(
        description="How long this node saw no leader before it (null: it saw no gap)."
    )


class HAStatus(BaseModel):
    node_name: str
    url: str
    role: Role
    is_leader: bool = Field(description="Leads, with a lease that has not run out.")
    leader_name: str | None
    leader_url: str | None
    term: int
    lease_ttl_s: int
    lease_remaining_s: float | None = Field(
        description="Leader: seconds before it stops acknowledging unless a keepalive is "
        "answered (the lease less LEASE_MARGIN_MS)."
    )
    failover_priority: int
    applied_through: int = Field(description="How up to date it is: what candidates compare.")
    last_version: int
    etcd_endpoints: list[str]
    etcd_error: str | None
    last_action: str = Field(description="What the last HA cycle did, in one sentence.")
    leader_changes: int
    elections: list[ElectionRecord]


def ha_router(node: HANode) -> APIRouter:
    router = APIRouter(tags=["node"])

    @router.get("/ha", response_model=HAStatus)
    async def ha() -> dict[str, Any]:
        """This node's part in the election: role, leader, term, lease, recent elections."""
        return node.status()

    return router


class HACollector(Collector):
    def __init__(self, node: HANode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield GaugeMetricFamily(
            "kv_is_leader", "1 while this node leads with a valid lease.", value=int(node.is_leader)
        )
        yield CounterMetricFamily(
            "kv_leader_changes", "Changes of leader this node has seen.", value=node.leader_changes
        )
        remaining = node.lease.remaining(time.monotonic()) if node.role is Role.LEADER else 0.0
        yield GaugeMetricFamily(
            "kv_lease_remaining_seconds",
            "Leader: seconds before it stops acknowledging unless a keepalive is answered.",
            value=remaining,
        )
        errors = CounterMetricFamily(
            "kv_etcd_errors", "etcd requests that failed, by operation.", labels=["op"]
        )
        for op in ETCD_OPERATIONS:
            errors.add_metric([op], node.etcd_errors[op])
        yield errors
        leader = GaugeMetricFamily(
            "kv_leader_info", "The leader this node knows of.", labels=["leader", "url", "term"]
        )
        if node.leader is not None:
            leader.add_metric([node.leader.name, node.leader.url, str(node.leader.term)], 1)
        yield leader


class HAApp:
    """The ASGI app uvicorn runs: the node's lifespan, then each request to its role's app."""

    def __init__(self, node: HANode) -> None:
        self.node = node
        node.routers.append(ha_router(node))
        node.collectors.append(HACollector(node))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self.node.app
        assert app is not None, "requests arrive only after the lifespan started the node"
        await app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.node.start()
                    freeze_startup_heap()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    raise
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.node.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
