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
    error: str | None = Field(
        None,
        description="Why ok is false: the follower's queue overflowed, or it holds another write.",
    )


class WriteResponse(BaseModel):
    key: str
    value: Any
    version: int = Field(
        description="Strictly increasing across leader restarts: (term - 1) * 10^9 + n."
    )
    deleted: bool = False
    term: int = Field(description="The leader's term, which assigned this version.")
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
    term: int
    acks: int
    write_quorum: int
    latency_ms: float
    replication: list[DeliveryReport]


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in one sentence.")
    detail: Any = None


class KeyNotFound(ErrorResponse):
    last_version: int = Field(
        description="The newest version this node holds. A follower applies a write after the "
        "leader has acknowledged it (semi-synchronous replication), so a follower whose "
        "last_version is below your write's version has not seen it yet."
    )
    applied_through: int = Field(
        description="Every write up to this version is applied on this node."
    )


class NotYetApplied(ErrorResponse):
    min_version: int = Field(description="The version the read asked for.")
    last_version: int = Field(
        description="This node's applied_through: every write up to it is applied here. Also "
        "in the X-Last-Version header of every read."
    )
    leader: str | None = Field(
        description="The leader's URL (LEADER_URL), which has applied every acknowledged write."
    )


class VersionConflict(ErrorResponse):
    key: str
    current_version: int = Field(
        description="The key's version now; 0 if it is absent or deleted. Also the ETag."
    )


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
    applied_through: int = Field(
        description="Every write up to this version is applied here: resume GET /watch from it."
    )
    term: int = Field(
        description="The leader: the term it assigns versions in; a follower: the newest seen."
    )


class FollowerStatus(BaseModel):
    url: str
    state: Literal["up", "lagging", "down", "resyncing"]
    lag: int = Field(
        description="Versions behind: the leader's last_version minus the follower's last report."
    )
    pending: int = Field(
        description="Entries not yet confirmed by this follower, in their simulated delay or not."
    )
    backlog: int = Field(
        description="Entries past their delay that it has failed to take: what "
        "MAX_REPLICATION_QUEUE caps."
    )
    delivered: int = Field(description="Entries this follower has confirmed.")
    batches: int = Field(
        description="Requests that carried them: delivered/batches is the batch size."
    )
    heartbeats: int = Field(
        description="Empty requests: sent when nothing else was for HEARTBEAT_S (0.5 s), so a "
        "follower that stops answering is seen down within HEARTBEAT_TIMEOUT_MS after that."
    )
    heartbeat_rtt_ms: float | None = Field(
        None, description="The last answered heartbeat's round trip, in ms."
    )
    resyncs: int = Field(
        description="Snapshots sent: to a follower that lacked what the leader holds, after a "
        "restart or an overflowing queue."
    )
    resync_entries: int = Field(
        0,
        description="Entries those snapshots held: the whole store after an overflowing queue "
        "or a restart with an empty memory; from the first entry that differs on after a "
        "restart with its DATA_DIR.",
    )
    pulls: int = Field(
        description="Times the leader read this follower's entries before sending it anything "
        "(first contact, restart, or a conflict)."
    )
    last_error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    role: Role
    leader_name: str | None = Field(
        None, description="The leader's NODE_NAME, where known (HA: from etcd)."
    )
    leader_url: str | None = Field(
        None, description="Where writes go: LEADER_URL, or the elected leader's URL (HA)."
    )
    last_version: int
    applied_through: int | None = Field(
        None, description="Every write up to this version is applied on this node."
    )
    term: int = Field(description="The leader's term, or the newest a follower has seen.")
    followers: int | None = Field(
        None, description="Leader only: how many followers it replicates to."
    )
    write_quorum: int | None = Field(None, description="Leader only: the default write quorum.")
    replicas: list[FollowerStatus] | None = Field(
        None, description="Leader only: each follower's state."
    )


class ReadyResponse(BaseModel):
    ready: bool
    reason: str | None = Field(None, description="Why not, while not ready.")
    term: int
    reachable: int | None = Field(
        None, description="Leader: followers not down, of which it needs WRITE_QUORUM."
    )
    write_quorum: int | None = None
    heard_from: int | None = Field(
        None, description="Leader: followers whose entries it has read at start-up."
    )
    startup_quorum: int | None = Field(None, description="Leader: how many it needs.")
    followers: int | None = None
    ready_after_s: float | None = Field(None, description="Leader: seconds from start to ready.")


class LeaderConfig(BaseModel):
    node_name: str = Field(description="NODE_NAME: the name in this node's log lines.")
    followers: list[str]
    write_quorum: int
    startup_quorum: int
    min_delay_ms: float
    max_delay_ms: float
    replication_timeout_ms: float
    heartbeat_timeout_ms: float
    max_replication_queue: int
    max_value_bytes: int
    data_dir: str | None
    appendfsync: str
    development_secret: bool = Field(
        description="True while REPLICATION_SECRET is the documented default."
    )


class FollowerConfig(BaseModel):
    node_name: str = Field(description="NODE_NAME: the name in this node's log lines.")
    leader_url: str | None
    max_value_bytes: int
    data_dir: str | None
    appendfsync: str
    development_secret: bool


class NodeInfo(BaseModel):
    service: str = "replicated-kv"
    role: Role
    leader_name: str | None = Field(None, description="The leader's NODE_NAME, where known.")
    leader_url: str | None = Field(None, description="Where writes go, where known.")
    term: int | None = Field(None, description="The leader's term, or the newest seen.")
    config: LeaderConfig | FollowerConfig
    docs: str = "/docs"


class PrimaryResponse(BaseModel):
    primary: bool = Field(description="True only on the leader, once it takes writes.")
    role: Role
    node_name: str
    leader_name: str | None = None
    leader_url: str | None = None
    term: int
    reason: str | None = Field(None, description="Why this node is not the primary.")


class RequestTagBody(BaseModel):
    """The client request that made an entry (its Idempotency-Key), replicated with it."""

    id: Annotated[StrictStr, Field(min_length=1, max_length=255)]
    digest: Annotated[StrictInt, Field(ge=0, lt=2**32)] = Field(
        description="CRC-32 of the request (key, delete or not, value), to tell a retry from a "
        "different request that reuses the key."
    )


class ReplicatedEntry(BaseModel):
    key: Key
    value: Any = None
    version: Annotated[StrictInt, Field(ge=1)]
    deleted: StrictBool = False
    request: RequestTagBody | None = None


class ReplicateRequest(BaseModel):
    term: Annotated[StrictInt, Field(ge=1)] | None = Field(
        None,
        description="The sending leader's term. Batches from a term older than the newest the "
        "follower has seen are refused with 409. Absent: a hand-made batch, not fenced.",
    )
    leader_id: StrictStr | None = Field(None, description="Random per leader process start.")
    through: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None,
        description="Once this batch is applied, the follower holds every write up to this "
        "version: its applied_through, which min_version reads wait for.",
    )
    node_id: StrictStr | None = Field(
        None, description="The follower process `through` is meant for; ignored by any other."
    )
    entries: list[ReplicatedEntry]


class ReplicateResponse(BaseModel):
    applied: int
    stale: int = Field(
        description="Entries older than what the follower already held: still a success."
    )
    last_version: int
    term: int = Field(description="The newest term this follower has seen.")
    node_id: str = Field(description="Random per process start, so the leader can tell a restart.")
    unconfirmed: list[int] = Field(
        default_factory=list,
        description="Versions in the batch the follower does not hold (it holds another write "
        "under that version): not confirmations.",
    )


class TermConflict(BaseModel):
    error: str
    detail: Any = None
    follower_term: int = Field(description="The newest term the follower has seen.")
    batch_term: int = Field(description="The term the refused batch came from.")


PAGE_LINES = "application/x-ndjson"
"""The media type of a follower's page in lines (`GET /replicate/entries?format=lines`)."""


class FollowerEntries(BaseModel):
    entries: list[ReplicatedEntry]
    last_version: int
    term: int = Field(description="The newest term this follower has seen.")
    node_id: str
    next_after: int | None = Field(
        description="Pass as after_version for the next page; null on the last page."
    )
