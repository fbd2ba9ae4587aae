"""Configuration from the environment, validated once at start-up.

A bad value stops the process with the variable's name and the reason, rather
than surfacing later as a confusing runtime error. The variable names are a
contract shared with docker-compose.yml, cluster.py and the tests.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kv.core.access import Policy
from kv.core.progress import HEARTBEAT_S
from kv.web.access import OpenEndpoints


class FsyncPolicy(StrEnum):
    """APPENDFSYNC, after Redis's appendfsync: when a node's log is fsynced."""

    ALWAYS = "always"
    EVERYSEC = "everysec"
    NO = "no"


# Documented in docs/operations/configuration.md. Fine on a laptop; a warning is logged
# while it is in use.
DEVELOPMENT_SECRET = "dev-replication-secret"
DEFAULT_WRITE_QUORUM = 3
MIB = 1024 * 1024

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["text", "json"]


class AccessLogMode(StrEnum):
    """ACCESS_LOG: the node logs its own requests; uvicorn's access log is always off."""

    OFF = "off"
    ON = "on"
    SAMPLED = "sampled"
    """Every 100th request, and every 5xx answer except a probe's (`/ready` 503)."""


class NodeSettings(BaseSettings):
    """Settings that both roles read."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    ROLE: ClassVar[str] = "node"

    replication_secret: str = Field(DEVELOPMENT_SECRET, min_length=1, repr=False)
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "text"
    access_log: AccessLogMode = AccessLogMode.SAMPLED
    # The name in every log line; unset: the role and the port from uvicorn's --port.
    node_name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[\w.:@-]+$")
    max_value_bytes: int = Field(MIB, ge=1, le=64 * MIB)
    # Unset: memory only. Set: an append-only log there, replayed at start-up.
    data_dir: Path | None = None
    appendfsync: FsyncPolicy = FsyncPolicy.EVERYSEC
    # Entries GET /watch can replay to a client that reconnects; older ones are compacted.
    change_feed_entries: int = Field(10_000, ge=1, le=10_000_000)
    # Entries one /watch client may fall behind before it is cut off (kv/web/watch.py).
    watch_max_pending: int = Field(10_000, ge=1, le=1_000_000)
    # How long, and how many, Idempotency-Keys every node remembers (kv/core/requests.py).
    idempotency_window_s: float = Field(600, gt=0, le=7 * 86_400)
    idempotency_max_keys: int = Field(100_000, ge=1, le=10_000_000)
    # TLS (kv/network/tls.py): the cluster's CA, which every outgoing link verifies against
    # and a follower takes replication's client certificates from; this node's own
    # certificate and key, which it serves and presents to its followers.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Bearer tokens (kv/core/access.py): unset, every client may do everything.
    auth_file: Path | None = None
    # While AUTH_FILE is set: what answers without a token (Prometheus and HAProxy).
    auth_open: OpenEndpoints = OpenEndpoints.PROBES_AND_METRICS
    _policy: Policy | None = PrivateAttr(None)

    @field_validator(
        "data_dir", "tls_ca_file", "tls_cert_file", "tls_key_file", "auth_file", mode="before"
    )
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("tls_ca_file", "tls_cert_file", "tls_key_file", "auth_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)!r} is not a file")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> NodeSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both or neither")
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ValueError(
                "TLS_CA_FILE is required with TLS_CERT_FILE: the CA this node verifies its "
                "peers' certificates against"
            )
        if self.auth_file is not None:
            try:
                self._policy = Policy.from_file(self.auth_file)
            except ValueError as error:
                raise ValueError(f"AUTH_FILE {str(self.auth_file)!r} {error}") from None
        return self

    @property
    def policy(self) -> Policy | None:
        """The tokens of AUTH_FILE, read once at start-up; None: auth is off."""
        return self._policy

    @property
    def tls(self) -> bool:
        """This node serves HTTPS and presents its certificate to the nodes it calls."""
        return self.tls_cert_file is not None

    @field_validator("appendfsync", "log_format", "access_log", "auth_open", mode="before")
    @classmethod
    def _lower_choice(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("node_name", mode="before")
    @classmethod
    def _empty_name_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def name(self) -> str:
        """NODE_NAME, else the role and the port uvicorn was told to listen on."""
        if self.node_name:
            return self.node_name
        port = port_from_argv(sys.argv)
        return f"{self.ROLE}:{port}" if port else self.ROLE

    @property
    def bind_host(self) -> str:
        """The address this node listens on: uvicorn's --host."""
        return host_from_argv(sys.argv)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read at all: a value in loose JSON, plus a key and slack."""
        return 2 * self.max_value_bytes + 64 * 1024

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def uses_development_secret(self) -> bool:
        return self.replication_secret == DEVELOPMENT_SECRET


class FollowerSettings(NodeSettings):
    ROLE: ClassVar[str] = "follower"

    leader_url: str | None = None

    @field_validator("leader_url", mode="before")
    @classmethod
    def _normalise_leader_url(cls, value: object) -> object:
        if isinstance(value, str):
            return normalise_url(value) if value.strip() else None
        return value


class LeaderSettings(NodeSettings):
    ROLE: ClassVar[str] = "leader"

    followers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # None means "not set": the default of 3, capped at the number of followers.
    write_quorum: int | None = Field(None, ge=0)
    min_delay_ms: float = Field(0, ge=0, le=3_600_000)
    max_delay_ms: float = Field(1000, ge=0, le=3_600_000)
    replication_timeout_ms: float = Field(5000, gt=0, le=3_600_000)
    # A heartbeat unanswered for this long marks its follower down: failure detection.
    heartbeat_timeout_ms: float = Field(500, gt=0, le=60_000)
    # Entries a follower has failed to take before it is cut over to a snapshot resync.
    max_replication_queue: int = Field(100_000, ge=1)
    # Followers whose entries a starting leader reads before it takes writes; None: N - W + 1.
    startup_quorum: int | None = Field(None, ge=0)

    @field_validator("followers", mode="before")
    @classmethod
    def _split_followers(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part for part in (p.strip() for p in value.split(",")) if part]
        if isinstance(value, list):
            urls = [normalise_url(str(part)) for part in value]
            duplicates = sorted({url for url in urls if urls.count(url) > 1})
            if duplicates:
                raise ValueError(f"lists {', '.join(duplicates)} more than once")
            return urls
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> LeaderSettings:
        if self.min_delay_ms > self.max_delay_ms:
            raise ValueError(
                f"MIN_DELAY_MS ({self.min_delay_ms:g}) must not exceed "
                f"MAX_DELAY_MS ({self.max_delay_ms:g})"
            )
        if self.write_quorum is not None and self.write_quorum > len(self.followers):
            raise ValueError(
                f"WRITE_QUORUM is {self.write_quorum} but FOLLOWERS names only "
                f"{len(self.followers)} follower(s); it must be between 0 and {len(self.followers)}"
            )
        if self.startup_quorum is None:
            # Frozen model: fill in the default once, so every reader sees one number.
            object.__setattr__(
                self, "startup_quorum", default_startup_quorum(len(self.followers), self.quorum)
            )
        elif self.startup_quorum > len(self.followers):
            raise ValueError(
                f"STARTUP_QUORUM is {self.startup_quorum} but FOLLOWERS names only "
                f"{len(self.followers)} follower(s); it must be between 0 and {len(self.followers)}"
            )
        return self

    @property
    def quorum(self) -> int:
        """The effective default quorum."""
        if self.write_quorum is None:
            return min(DEFAULT_WRITE_QUORUM, len(self.followers))
        return self.write_quorum


def default_startup_quorum(followers: int, write_quorum: int) -> int:
    """N - W + 1: every set of W followers shares one with it (at most N)."""
    return max(0, min(followers, followers - write_quorum + 1))


def normalise_url(value: str) -> str:
    """Accept `http://host:port` or bare `host:port`; return a base URL without a trailing slash."""
    value = value.strip()
    if "://" not in value:
        value = f"http://{value}"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} is not an http(s) URL")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not have a query or fragment")
    return value.rstrip("/")


SettingsT = TypeVar("SettingsT", bound=NodeSettings)


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem, naming the environment variable."""
    lines = []
    for problem in error.errors():
        names = [str(part).upper() for part in problem["loc"] if isinstance(part, str)]
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{names[0]}: {message}" if names else message)
    return lines


def load_settings(cls: type[SettingsT]) -> SettingsT:
    """Read settings from the environment, or exit non-zero saying which variable is wrong."""
    try:
        return cls()
    except ValidationError as error:
        for line in describe_errors(error):
            print(f"configuration error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def port_from_argv(argv: list[str]) -> str | None:
    """The value of `--port N` or `--port=N`, as uvicorn's command line takes it."""
    return option_from_argv(argv, "--port")


def host_from_argv(argv: list[str]) -> str:
    """The address uvicorn binds: `--host`, else its default, 127.0.0.1."""
    return option_from_argv(argv, "--host") or "127.0.0.1"


def option_from_argv(argv: list[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.removeprefix(option + "=")
    return None


ETCD_MIN_TTL_S = 2
"""etcd grants no lease under 2 s (a TTL of 1 is granted as 2)."""
MIN_CHECK_QUORUM_MS = round(2 * HEARTBEAT_S * 1000)
"""Twice the heartbeat period: a shorter check-quorum window would depose a leader whose
idle followers answer every heartbeat."""


class HASettings(NodeSettings):
    """`python -m kv.ha`: one node of a cluster whose leader is elected through etcd.

    The write path's settings (WRITE_QUORUM, delays, timeouts...) are the leader's and are
    read by :meth:`leader_settings`; these are the election's. Defaults meet the failover
    goal in docs/operations/high-availability.md: a SIGKILLed leader's lease is gone
    2.0-2.5 s after its last keepalive, and the most up-to-date follower campaigns at once.
    """

    ROLE: ClassVar[str] = "node"

    cluster: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    etcd_endpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    etcd_prefix: str = Field("/replicated-kv", pattern=r"^/[\w./-]*[^/]$")
    # The leader key's lease. etcd's minimum is 2 s.
    lease_ttl_s: int = Field(ETCD_MIN_TTL_S, ge=ETCD_MIN_TTL_S, le=600)
    # How often the leader renews its lease; also how often every node re-reads etcd when
    # the watch has told it nothing.
    lease_renew_ms: float = Field(500, ge=50, le=60_000)
    # The leader stops acknowledging writes this long before its lease can have expired,
    # counted from when the last answered keepalive was sent.
    lease_margin_ms: float = Field(500, ge=0, le=60_000)
    # 0: never lead. Among equally up-to-date followers the highest priority campaigns first.
    failover_priority: int = Field(1, ge=0, le=1000)
    # A follower that is behind waits this long per better-placed peer before it campaigns.
    campaign_delay_ms: float = Field(300, ge=0, le=60_000)
    # Check-quorum: a leader that has not heard from WRITE_QUORUM followers for this long
    # steps down. None: LEASE_TTL_S less LEASE_MARGIN_MS (1.5 s by default), as long as a
    # leader cut off from etcd goes on; 0: never.
    check_quorum_ms: float | None = Field(None, ge=0, le=600_000)
    # A promoted node whose start-up read makes no progress (no page read, no term recorded
    # on a follower) for this long releases its lease. None: twice LEASE_TTL_S.
    startup_timeout_ms: float | None = Field(None, gt=0, le=600_000)
    write_quorum: int | None = Field(None, ge=0)

    @field_validator("cluster", mode="before")
    @classmethod
    def _parse_cluster(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        members: dict[str, str] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, url = part.partition("=")
            name = name.strip()
            if not sep or not name or not url.strip():
                raise ValueError(f"{part!r} is not name=url")
            if name in members:
                raise ValueError(f"names {name!r} more than once")
            members[name] = normalise_url(url)
        urls = list(members.values())
        duplicates = sorted({url for url in urls if urls.count(url) > 1})
        if duplicates:
            raise ValueError(f"lists {', '.join(duplicates)} more than once")
        return members

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        if isinstance(value, str):
            return [normalise_url(p) for p in value.split(",") if p.strip()]
        return value

    @model_validator(mode="after")
    def _check_membership(self) -> HASettings:
        if not self.cluster:
            raise ValueError("CLUSTER is required: every node as name=url, comma-separated")
        if len(self.cluster) < 2:
            raise ValueError("CLUSTER must name at least two nodes (a leader and a follower)")
        if not self.node_name:
            raise ValueError("NODE_NAME is required: this node's name in CLUSTER")
        if self.node_name not in self.cluster:
            raise ValueError(
                f"NODE_NAME {self.node_name!r} is not in CLUSTER ({', '.join(self.cluster)})"
            )
        if not self.etcd_endpoints:
            raise ValueError("ETCD_ENDPOINTS is required: etcd's client URLs, comma-separated")
        followers = len(self.cluster) - 1
        if self.write_quorum is not None and self.write_quorum > followers:
            raise ValueError(
                f"WRITE_QUORUM is {self.write_quorum} but CLUSTER has {len(self.cluster)} nodes, "
                f"so a leader has {followers} followers; it must be between 0 and {followers}"
            )
        if self.lease_margin_ms >= self.lease_ttl_s * 1000:
            raise ValueError(
                f"LEASE_MARGIN_MS ({self.lease_margin_ms:g}) must be below LEASE_TTL_S "
                f"({self.lease_ttl_s}) in ms"
            )
        usable_ms = self.lease_ttl_s * 1000 - self.lease_margin_ms
        if self.lease_renew_ms * 2 > usable_ms:
            raise ValueError(
                f"LEASE_RENEW_MS ({self.lease_renew_ms:g}) must be at most half of LEASE_TTL_S "
                f"less LEASE_MARGIN_MS ({usable_ms:g} ms), so that a lost keepalive is tried "
                "again before the leader's lease runs out"
            )
        if self.check_quorum_ms and self.check_quorum_ms < MIN_CHECK_QUORUM_MS:
            raise ValueError(
                f"CHECK_QUORUM_MS ({self.check_quorum_ms:g}) must be 0 (off) or at least "
                f"{MIN_CHECK_QUORUM_MS} ms: an idle follower is heard from only every "
                f"{HEARTBEAT_S * 1000:g} ms "
                "(its heartbeat), so a shorter window would depose a healthy leader"
            )
        return self

    @property
    def check_quorum_s(self) -> float:
        """How long a leader may go without hearing from WRITE_QUORUM followers (0: forever)."""
        if self.check_quorum_ms is None:
            return (self.lease_ttl_s * 1000 - self.lease_margin_ms) / 1000
        return self.check_quorum_ms / 1000

    @property
    def startup_timeout_s(self) -> float:
        """How long a promoted node's start-up read may make no progress."""
        if self.startup_timeout_ms is None:
            return 2.0 * self.lease_ttl_s
        return self.startup_timeout_ms / 1000

    @property
    def url(self) -> str:
        return self.cluster[str(self.node_name)]

    @property
    def bind_host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def peers(self) -> dict[str, str]:
        """Every other node, by name: a leader's followers."""
        return {name: url for name, url in self.cluster.items() if name != self.node_name}

    @property
    def quorum(self) -> int:
        if self.write_quorum is None:
            return min(DEFAULT_WRITE_QUORUM, len(self.peers))
        return self.write_quorum

    def leader_settings(self) -> LeaderSettings:
        """This node's settings as a leader: its peers are its followers; the rest of the
        leader's settings come from the environment, as for leader.py."""
        return LeaderSettings(
            followers=list(self.peers.values()),
            write_quorum=self.quorum,
            startup_quorum=promoted_startup_quorum(len(self.peers), self.quorum),
            node_name=self.node_name,
        )

    def follower_settings(self) -> FollowerSettings:
        return FollowerSettings(node_name=self.node_name, leader_url=None)


def promoted_startup_quorum(followers: int, write_quorum: int) -> int:
    """The peers a promoted follower reads before it takes writes: N - W, itself the N-W+1th.

    A write acknowledged at quorum W is on W of the N nodes other than the leader that
    assigned it. A promoted node is one of those N, and it holds what it confirmed, so it
    and N - W more of them meet every such set of W. Capped at N - 1: the old leader, one of
    the N peers, may be dead (this only matters at W = 0, which guarantees nothing anyway).
    """
    return max(0, min(followers - write_quorum, followers - 1))
