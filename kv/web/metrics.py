"""`GET /metrics` in the Prometheus text format, read from state the nodes already keep.

Nothing here runs on the write path. Each scrape walks the node's counters (kv/core/stats.py),
its followers' progress and its store's last version, and turns them into metric families
through a custom prometheus-client collector; a write only pays the few integer additions
of :class:`WriteStats`. Each app has its own registry, so tests can run many apps in one
process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.responses import Response

from kv.core.progress import FollowerState
from kv.core.stats import WriteFailure
from kv.follower.service import FollowerService
from kv.leader.service import LeaderNode

METRICS_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {CONTENT_TYPE_LATEST: {}},
        "description": "Prometheus text format; see docs/operations/metrics.md.",
    }
}
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}
"""FastAPI's native OpenTelemetry, off: the nodes' metrics are Prometheus's (GET /metrics), and
asking OpenTelemetry whether a provider is configured cost about 3 % of the leader's CPU per
write when profiled, with none configured."""


def node_gauges(role: str, name: str, term: int, last_version: int) -> Iterator[Metric]:
    info = GaugeMetricFamily("kv_node_info", "This node's role and name.", labels=["role", "node"])
    info.add_metric([role, name], 1)
    yield info
    yield GaugeMetricFamily("kv_term", "The newest term this node has seen.", value=term)
    yield GaugeMetricFamily(
        "kv_last_version", "The newest version this node holds.", value=last_version
    )


class LeaderCollector(Collector):
    def __init__(self, node: LeaderNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node, now = self.node, time.monotonic()
        yield from node_gauges("leader", node.settings.name, node.term, node.store.last_version)
        yield GaugeMetricFamily(
            "kv_ready", "1 when /ready answers 200.", value=int(node.unready_reason() is None)
        )
        yield GaugeMetricFamily(
            "kv_write_quorum", "WRITE_QUORUM, the default w.", value=node.settings.quorum
        )
        latency = HistogramMetricFamily(
            "kv_write_latency_seconds",
            "Acknowledged writes: from receipt to the answer, by the w they waited for.",
            labels=["quorum"],
        )
        writes = CounterMetricFamily(
            "kv_writes", "Writes acknowledged (200), by w.", labels=["quorum"]
        )
        for quorum, histogram in sorted(node.write_stats.latency_by_quorum.items()):
            buckets = [(_bound(le), count) for le, count in histogram.cumulative()]
            latency.add_metric([str(quorum)], buckets, histogram.total)
            writes.add_metric([str(quorum)], histogram.count)
        yield latency
        yield writes
        failures = CounterMetricFamily(
            "kv_write_failures", "Writes answered 503, by reason.", labels=["reason"]
        )
        for reason in WriteFailure:
            failures.add_metric([reason.value], node.write_stats.failures[reason])
        yield failures
        yield from self._followers(now)

    def _followers(self, now: float) -> Iterator[Metric]:
        labels = ["follower"]
        state = GaugeMetricFamily(
            "kv_follower_state", "1 for the follower's current state.", labels=[*labels, "state"]
        )
        lag = GaugeMetricFamily(
            "kv_follower_lag_versions",
            "The leader's last version minus the follower's.",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "kv_follower_pending_entries", "Entries not yet confirmed.", labels=labels
        )
        backlog = GaugeMetricFamily(
            "kv_follower_backlog_entries",
            "Entries past their delay it failed to take (MAX_REPLICATION_QUEUE caps it).",
            labels=labels,
        )
        rtt = GaugeMetricFamily(
            "kv_follower_heartbeat_rtt_seconds", "The last heartbeat's round trip.", labels=labels
        )
        counters = {
            "delivered": CounterMetricFamily(
                "kv_follower_delivered_entries", "Entries confirmed.", labels=labels
            ),
            "batches": CounterMetricFamily(
                "kv_follower_batches", "Data batches confirmed.", labels=labels
            ),
            "heartbeats": CounterMetricFamily(
                "kv_follower_heartbeats", "Heartbeats answered.", labels=labels
            ),
            "resyncs": CounterMetricFamily(
                "kv_follower_resyncs", "Snapshots of the store queued for it.", labels=labels
            ),
            "resync_entries": CounterMetricFamily(
                "kv_follower_resync_entries", "Entries those snapshots held.", labels=labels
            ),
            "pulls": CounterMetricFamily(
                "kv_follower_pulls", "Times its entries were read and merged.", labels=labels
            ),
        }
        for link in self.node.replicator.links:
            progress, url = link.progress, link.url
            current = progress.state(now)
            for each in FollowerState:
                state.add_metric([url, each.value], int(each is current))
            lag.add_metric([url], progress.lag(self.node.store.last_version))
            pending.add_metric([url], progress.pending)
            backlog.add_metric([url], progress.backlog(now))
            if progress.heartbeat_rtt is not None:
                rtt.add_metric([url], progress.heartbeat_rtt)
            for field, family in counters.items():
                family.add_metric([url], getattr(progress, field))
        yield from (state, lag, pending, backlog, rtt, *counters.values())


class FollowerCollector(Collector):
    def __init__(self, node: FollowerService) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        last_version = node.storage.store.last_version
        yield from node_gauges("follower", node.settings.name, node.term, last_version)
        stats = node.stats
        yield CounterMetricFamily(
            "kv_replicate_batches", "Data batches accepted.", value=stats.batches
        )
        yield CounterMetricFamily(
            "kv_heartbeats", "Heartbeats (empty batches) accepted.", value=stats.heartbeats
        )
        yield CounterMetricFamily(
            "kv_applied_entries", "Entries applied: newer than what was held.", value=stats.applied
        )
        yield CounterMetricFamily(
            "kv_stale_entries", "Entries not applied: a newer write was held.", value=stats.stale
        )
        yield CounterMetricFamily(
            "kv_refused_batches",
            "Batches refused with 409: from a term older than the newest seen.",
            value=stats.refused_batches,
        )


def registry_for(*collectors: Collector) -> CollectorRegistry:
    """A registry of its own for one app: its collectors and the process's CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def metrics_router(*collectors: Collector) -> APIRouter:
    """`GET /metrics`, the same route on both roles; only the collectors differ (an HA node
    adds its own)."""
    registry = registry_for(*collectors)
    router = APIRouter(tags=["node"])

    @router.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def metrics() -> Response:
        """Prometheus metrics, read from the node's state at scrape time
        (docs/operations/metrics.md)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _bound(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(le)
