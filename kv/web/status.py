"""Status bodies: the leader's /health (each follower's state) and /ready, and both roles' /."""

from __future__ import annotations

import time
from typing import Any

from kv.leader.service import LeaderNode
from kv.settings import FollowerSettings, NodeSettings
from kv.web.schemas import (
    FollowerConfig,
    FollowerStatus,
    HealthResponse,
    LeaderConfig,
    NodeInfo,
    ReadyResponse,
)


def leader_health(node: LeaderNode) -> HealthResponse:
    now, store, settings = time.monotonic(), node.store, node.settings
    return HealthResponse(
        role="leader",
        last_version=store.last_version,
        term=node.term,
        followers=len(settings.followers),
        write_quorum=settings.quorum,
        replicas=[
            FollowerStatus(
                url=link.url,
                state=link.state.value,
                lag=link.progress.lag(store.last_version),
                pending=link.progress.pending,
                backlog=link.progress.backlog(now),
                delivered=link.progress.delivered,
                batches=link.progress.batches,
                heartbeats=link.progress.heartbeats,
                heartbeat_rtt_ms=None
                if link.progress.heartbeat_rtt is None
                else round(link.progress.heartbeat_rtt * 1000, 3),
                resyncs=link.progress.resyncs,
                pulls=link.progress.pulls,
                last_error=link.progress.last_error,
            )
            for link in node.replicator.links
        ],
    )


def leader_ready(node: LeaderNode) -> ReadyResponse:
    reason = node.unready_reason()
    return ReadyResponse(
        ready=reason is None,
        reason=reason,
        term=node.term,
        reachable=node.replicator.confirmable(),
        write_quorum=node.settings.quorum,
        heard_from=node.startup.heard,
        startup_quorum=node.startup.quorum,
        followers=len(node.settings.followers),
        ready_after_s=node.ready_after_s,
    )


def node_config(settings: NodeSettings) -> dict[str, Any]:
    """The part of `GET /` both roles show: never the secret, only whether it is the default."""
    return {
        "node_name": settings.name,
        "max_value_bytes": settings.max_value_bytes,
        "data_dir": str(settings.data_dir) if settings.data_dir else None,
        "appendfsync": settings.appendfsync.value,
        "development_secret": settings.uses_development_secret,
    }


def leader_info(node: LeaderNode) -> NodeInfo:
    settings = node.settings
    return NodeInfo(
        role="leader",
        config=LeaderConfig(
            **node_config(settings),
            followers=settings.followers,
            write_quorum=settings.quorum,
            startup_quorum=node.startup.quorum,
            min_delay_ms=settings.min_delay_ms,
            max_delay_ms=settings.max_delay_ms,
            replication_timeout_ms=settings.replication_timeout_ms,
            heartbeat_timeout_ms=settings.heartbeat_timeout_ms,
            max_replication_queue=settings.max_replication_queue,
        ),
    )


def follower_info(settings: FollowerSettings) -> NodeInfo:
    return NodeInfo(
        role="follower",
        config=FollowerConfig(**node_config(settings), leader_url=settings.leader_url),
    )
