"""Reads that wait for a version: read-your-writes and monotonic reads on any node.

A client passes the `version` its write was acknowledged with (or the `X-Last-Version`
of its last read) as `?min_version=` or `X-Min-Version`. A node that has not applied it
waits up to `?wait_ms=` for it, woken by an event when it applies entries (never by
polling), then answers with the data, or 503 with how far it has got and where the
leader is. Nobody waiting costs one list check per applied batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Protocol

from fastapi import Header, Query

from kv.core.changes import ChangeFeed
from kv.core.store import VersionedStore

MAX_WAIT_MS = 30_000
LAST_VERSION_HEADER = "X-Last-Version"

MinVersionQuery = Annotated[
    int | None,
    Query(
        ge=0,
        description="Answer only once this node has applied every write up to this version "
        "(read-your-writes: the version your write returned; monotonic reads: the "
        "X-Last-Version of your last read).",
    ),
]
MinVersionHeader = Annotated[
    int | None, Header(ge=0, description="The same as ?min_version=; the larger one counts.")
]
WaitMs = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_MS,
        description=f"How long to wait for min_version, in ms (at most {MAX_WAIT_MS}).",
    ),
]


class ReadableNode(Protocol):
    """What the read routes need from either role."""

    @property
    def store(self) -> VersionedStore: ...

    @property
    def term(self) -> int: ...

    @property
    def applied_through(self) -> int:
        """Every write up to this version is applied on this node."""

    @property
    def leader_url(self) -> str | None: ...

    @property
    def gate(self) -> VersionGate: ...

    @property
    def changes(self) -> ChangeFeed: ...


class VersionGate:
    """Readers waiting for a condition on this node's store, woken after each apply."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def notify(self) -> None:
        """Something was applied: wake the readers whose condition now holds."""
        if not self._waiters:
            return
        waiting = []
        for ready, future in self._waiters:
            if future.done():
                continue
            if ready():
                future.set_result(None)
            else:
                waiting.append((ready, future))
        self._waiters = waiting

    async def wait_for(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Whether `ready()` holds, waiting up to `timeout_s` for an apply to make it so."""
        if ready():
            return True
        if timeout_s <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((ready, future))
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            pass
        finally:
            if not future.done():
                future.cancel()
        return ready()

    @property
    def waiting(self) -> int:
        return sum(1 for _, future in self._waiters if not future.done())


def etag(version: int) -> str:
    """A version as an HTTP entity tag, for reads, writes and If-Match."""
    return f'"{version}"'


def wanted_version(query: int | None, header: int | None) -> int | None:
    """The stricter of ?min_version= and X-Min-Version, if either is given."""
    given = [v for v in (query, header) if v is not None]
    return max(given) if given else None
