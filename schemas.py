"""Every request and response body on the wire, shared by both roles.

Keeping them in one module makes `/docs` on either node a complete reference,
and keeps the leader and the follower from drifting apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_KEY_LENGTH = 1024

Key = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=MAX_KEY_LENGTH,
        description="Any non-empty string up to 1024 characters.",
    ),
]
Role = Literal["leader", "follower"]


class WriteRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"key": "colour", "value": "blue"}]})

    key: Key
    value: Any = Field(..., description="Any JSON value, up to MAX_VALUE_BYTES once encoded.")


class ValueRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"value": {"any": ["json", 1]}}]})

    value: Any = Field(..., description="Any JSON value, up to MAX_VALUE_BYTES once encoded.")


class DeliveryReport(BaseModel):
    follower: str
    ok: bool
    delay_ms: float = Field(description="The simulated network delay drawn for this delivery.")
    latency_ms: float = Field(description="From the leader's apply to the follower's confirmation.")
    attempts: int


class WriteResponse(BaseModel):
    key: str
    value: Any
    version: int
    deleted: bool = False
    acks: int = Field(description="Followers that had confirmed when this response was sent.")
    write_quorum: int
    latency_ms: float
    replication: list[DeliveryReport] = Field(
        description="The deliveries finished when this response was sent."
    )


class QuorumError(BaseModel):
    error: str
    key: str
    version: int = Field(description="The version the write holds on the leader, where it stays.")
    acks: int
    write_quorum: int
    latency_ms: float
    replication: list[DeliveryReport]


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in one sentence.")
    detail: Any = None


class KeyValue(BaseModel):
    key: str
    value: Any
    version: int


class KeyList(BaseModel):
    keys: list[str]
    count: int


class StateResponse(BaseModel):
    role: Role
    store: dict[str, Any]
    versions: dict[str, int]
    last_version: int


class FollowerStatus(BaseModel):
    url: str
    state: Literal["up", "lagging", "down", "resyncing"]
    lag: int = Field(
        description="Versions behind: the leader's last_version minus the follower's last report."
    )
    pending: int = Field(description="Entries not yet confirmed by this follower.")
    delivered: int = Field(description="Entries this follower has confirmed.")
    batches: int = Field(
        description="Requests that carried them: delivered/batches is the batch size."
    )
    resyncs: int = Field(
        description="Snapshots sent: at first contact, after a restart, after an overflowing queue."
    )
    last_error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    role: Role
    last_version: int
    followers: int | None = Field(
        None, description="Leader only: how many followers it replicates to."
    )
    write_quorum: int | None = Field(None, description="Leader only: the default write quorum.")
    replicas: list[FollowerStatus] | None = Field(
        None, description="Leader only: each follower's state."
    )


class LeaderConfig(BaseModel):
    followers: list[str]
    write_quorum: int
    min_delay_ms: float
    max_delay_ms: float
    replication_timeout_ms: float
    max_replication_queue: int
    max_value_bytes: int
    data_dir: str | None
    appendfsync: str
    development_secret: bool = Field(
        description="True while REPLICATION_SECRET is the documented default."
    )


class FollowerConfig(BaseModel):
    leader_url: str | None
    max_value_bytes: int
    data_dir: str | None
    appendfsync: str
    development_secret: bool


class NodeInfo(BaseModel):
    service: str = "replicated-kv"
    role: Role
    config: LeaderConfig | FollowerConfig
    docs: str = "/docs"


class ReplicatedEntry(BaseModel):
    key: Key
    value: Any = None
    version: Annotated[StrictInt, Field(ge=1)]
    deleted: StrictBool = False


class ReplicateRequest(BaseModel):
    entries: list[ReplicatedEntry]


class ReplicateResponse(BaseModel):
    applied: int
    stale: int = Field(
        description="Entries older than what the follower already held: still a success."
    )
    last_version: int
    node_id: str = Field(description="Random per process start, so the leader can tell a restart.")


class FollowerEntries(BaseModel):
    entries: list[ReplicatedEntry]
    last_version: int
    node_id: str
