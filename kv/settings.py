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

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class FsyncPolicy(StrEnum):
    """APPENDFSYNC, after Redis's appendfsync: when a node's log is fsynced."""

    ALWAYS = "always"
    EVERYSEC = "everysec"
    NO = "no"


# Documented in the README. Fine on a laptop; a warning is logged while it is in use.
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

    @field_validator("data_dir", mode="before")
    @classmethod
    def _empty_data_dir_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("appendfsync", "log_format", "access_log", mode="before")
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
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--port="):
            return arg.removeprefix("--port=")
    return None
