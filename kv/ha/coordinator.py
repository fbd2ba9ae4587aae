"""What the HA loop asks of etcd, as a small interface, and an in-memory stand-in for it.

After Patroni's `AbstractDCS`: the loop (kv/ha/node.py) reads the cluster, campaigns,
renews and revokes through a :class:`Coordinator`; kv/ha/etcd.py is the real one.
:class:`MemoryEtcd` keeps the same state in memory with a clock the caller moves, and
hands each node a :class:`MemoryCoordinator` that a test can cut off, so the loop's
tests can cut a node from etcd and run a lease out in microseconds, with no process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from kv.ha.decide import ClusterView, LeaderRecord
from kv.ha.etcd import REQUEST_TIMEOUT_S, EtcdError

Clock = Callable[[], float]


class Coordinator(Protocol):
    """The leader key on a lease, and the term counter raised with it (kv/ha/etcd.py)."""

    @property
    def where(self) -> str:
        """Where the coordinator is, for logs: etcd's endpoints."""

    async def read(self) -> ClusterView: ...

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: its id and the TTL granted."""

    async def keepalive(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> int:
        """Renew `lease`; the TTL it now has, 0 if it has expired."""

    async def revoke(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        """Drop `lease` and the leader key on it; an unknown lease is no error."""

    async def campaign(
        self, url: str, lease: int, view: ClusterView, floor: int
    ) -> LeaderRecord | None:
        """Create the leader key on `lease` if vacant, in a term above `view`'s and `floor`."""

    async def raise_term(self, record: LeaderRecord, at_least: int) -> LeaderRecord: ...

    async def watch(self, on_change: Callable[[], Awaitable[None] | None]) -> None:
        """Call `on_change` whenever the leader key or the term changes; runs until cancelled."""

    async def aclose(self) -> None: ...


@dataclass
class MemoryEtcd:
    """etcd's part in an election, in memory: leases that expire on `clock`, one leader key,
    a term counter with a revision. Shared by every node of a test cluster."""

    clock: Clock
    leader: LeaderRecord | None = None
    term: int = 0
    term_revision: int = 0
    leases: dict[int, tuple[float, int]] = field(default_factory=dict)
    """Each lease's expiry and TTL."""
    watchers: list[Callable[[], object]] = field(default_factory=list)
    _notified: set[asyncio.Future[object]] = field(default_factory=set)
    _next_lease: int = 1
    _revision: int = 0

    def client(self, name: str) -> MemoryCoordinator:
        return MemoryCoordinator(self, name)

    def expire(self) -> None:
        """Drop every lease whose TTL has run out on the clock, and the key on it."""
        now = self.clock()
        for lease, (expiry, _) in list(self.leases.items()):
            if now >= expiry:
                self.drop(lease)

    def drop(self, lease: int) -> None:
        self.leases.pop(lease, None)
        if self.leader is not None and self.leader.lease == lease:
            self.leader = None
            self.changed()

    def changed(self) -> None:
        for watcher in list(self.watchers):
            result = watcher()
            if asyncio.iscoroutine(result):
                future = asyncio.ensure_future(result)
                self._notified.add(future)
                future.add_done_callback(self._notified.discard)


@dataclass
class MemoryCoordinator:
    """One node's connection to a :class:`MemoryEtcd`; `reachable = False` cuts it off."""

    etcd: MemoryEtcd
    name: str
    reachable: bool = True
    calls: int = 0

    @property
    def where(self) -> str:
        return "memory"

    def _reach(self) -> MemoryEtcd:
        self.calls += 1
        if not self.reachable:
            raise EtcdError("cannot reach etcd at memory: no answer within 1000 ms")
        self.etcd.expire()
        return self.etcd

    async def read(self) -> ClusterView:
        etcd = self._reach()
        return ClusterView(etcd.leader, etcd.term, etcd.term_revision)

    async def grant(self, ttl: int) -> tuple[int, int]:
        etcd = self._reach()
        lease = etcd._next_lease
        etcd._next_lease += 1
        etcd.leases[lease] = (etcd.clock() + ttl, ttl)
        return lease, ttl

    async def keepalive(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> int:
        etcd = self._reach()
        if lease not in etcd.leases:
            return 0
        ttl = etcd.leases[lease][1]
        etcd.leases[lease] = (etcd.clock() + ttl, ttl)
        return ttl

    async def revoke(self, lease: int, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self._reach().drop(lease)

    async def campaign(
        self, url: str, lease: int, view: ClusterView, floor: int
    ) -> LeaderRecord | None:
        etcd = self._reach()
        if etcd.leader is not None or etcd.term_revision != view.term_revision:
            return None
        if lease not in etcd.leases:
            raise EtcdError(f"etcd at memory answered: requested lease {lease:x} not found")
        etcd._revision += 1
        etcd.term, etcd.term_revision = max(view.term, floor) + 1, etcd._revision
        etcd.leader = LeaderRecord(self.name, url, etcd.term, lease)
        etcd.changed()
        return etcd.leader

    async def raise_term(self, record: LeaderRecord, at_least: int) -> LeaderRecord:
        etcd = self._reach()
        if etcd.leader is None or etcd.leader.lease != record.lease:
            raise EtcdError("lost the leader key while raising the term")
        etcd._revision += 1
        etcd.term, etcd.term_revision = max(etcd.term + 1, at_least), etcd._revision
        etcd.leader = LeaderRecord(record.name, record.url, etcd.term, record.lease)
        etcd.changed()
        return etcd.leader

    async def watch(self, on_change: Callable[[], Awaitable[None] | None]) -> None:
        def notify() -> object:
            return on_change() if self.reachable else None

        self.etcd.watchers.append(notify)
        try:
            await asyncio.Event().wait()
        finally:
            self.etcd.watchers.remove(notify)

    async def aclose(self) -> None:
        return None
