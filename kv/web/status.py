"""Status bodies: the leader's /health (each follower's state) and /ready, and both roles' /."""

from __future__ import annotations

import time
from typing import Any, Protocol

from fastapi.responses import JSONResponse

from kv.follower.service import FollowerService
from kv.leader.service import LeaderNode
from kv.settings import NodeSettings
from kv.web.schemas import (
    FollowerConfig,
    FollowerStatus,
    HealthResponse,
    LeaderConfig,
    NodeInfo,
    PrimaryResponse,
    ReadyResponse,
    Role,
)


def leader_health(node: LeaderNode) -> HealthResponse:
    now, store, settings = time.monotonic(), node.store, node.settings
    return HealthResponse(
        role="leader",
        leader_name=node.leader_name,
        leader_url=node.leader_url,
        last_version=store.last_version,
        applied_through=node.applied_through,
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
                resync_entries=link.progress.resync_entries,
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
        leader_name=node.leader_name,
        leader_url=node.leader_url,
        term=node.term,
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


def follower_info(node: FollowerService) -> NodeInfo:
    return NodeInfo(
        role="follower",
        leader_name=node.leader_name,
        leader_url=node.leader_url,
        term=node.term,
        config=FollowerConfig(**node_config(node.settings), leader_url=node.leader_url),
    )


def follower_health(node: FollowerService) -> HealthResponse:
    return HealthResponse(
        role="follower",
        leader_name=node.leader_name,
        leader_url=node.leader_url,
        last_version=node.store.last_version,
        applied_through=node.applied_through,
        term=node.term,
    )


class PrimaryNode(Protocol):
    @property
    def settings(self) -> NodeSettings: ...
    @property
    def leader_name(self) -> str | None: ...
    @property
    def leader_url(self) -> str | None: ...
    @property
    def term(self) -> int: ...


def primary_answer(node: PrimaryNode, role: Role, reason: str | None) -> JSONResponse:
    """`GET /primary`: 200 on the node that leads and takes writes, 503 with why elsewhere."""
    body = PrimaryResponse(
        primary=reason is None,
        role=role,
        node_name=node.settings.name,
        leader_name=node.leader_name,
        leader_url=node.leader_url,
        term=node.term,
        reason=reason,
    )
    return JSONResponse(body.model_dump(), status_code=200 if reason is None else 503)
