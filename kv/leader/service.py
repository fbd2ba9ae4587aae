"""The leader's network side: a link to every follower, and the start-up read, around LeaderCore.

leader.py's routes translate HTTP to calls on a :class:`LeaderNode`; the rules it
follows are :class:`leader_core.LeaderCore`'s, which this class extends with I/O
only: the log (through :class:`durability.Storage`), one delivery loop and client
per follower, and the start-up read running in the background.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import httpx

from kv.core.contact import quorum_lost
from kv.core.outbox import DelayModel
from kv.core.progress import FollowerProgress
from kv.core.records import Entry
from kv.core.startup import TermTooLowError
from kv.core.stats import WriteStats
from kv.core.store import StoreView
from kv.leader.node import LeaderCore
from kv.network.delivery import Delivery, FollowerLink, Replicator, follower_client
from kv.network.tls import client_context
from kv.settings import LeaderSettings
from kv.storage.heap import bulk_load
from kv.storage.state import NodeState, node_state

log = logging.getLogger("kvstore.leader")

ClientFactory = Callable[[str], httpx.AsyncClient]
MAX_IN_FLIGHT_PER_FOLLOWER = 1
STEPPED_DOWN = "the leader stopped leading before this follower confirmed"


class Authority(Protocol):
    """What lets an elected leader acknowledge writes: its lease (kv/ha/lease.py)."""

    def refusal(self, now: float) -> str | None:
        """None while the leader may acknowledge; otherwise why it may not."""


class LeaderNode(LeaderCore):
    """One leader process: LeaderCore, its log, and a delivery loop to every follower."""

    def __init__(
        self,
        settings: LeaderSettings,
        *,
        client_factory: ClientFactory | None = None,
        rng: random.Random | None = None,
        shared: NodeState | None = None,
        authority: Authority | None = None,
        granted_term: int | None = None,
        term_source: Callable[[int], Awaitable[int]] | None = None,
        deposed: Callable[[int], None] | None = None,
        url: str | None = None,
    ) -> None:
        """An elected leader (kv/ha) passes what it keeps across roles (`shared`), its lease
        (`authority`), the term etcd granted it and a way to get a higher one (`term_source`),
        what to call when a newer leader appears (`deposed`), and its own `url`."""
        self.settings = settings
        self.owns_storage = shared is None
        if shared is None:
            shared = node_state(settings)
        self.storage, self.changes, self.gate = shared
        self.authority = authority
        self.term_source = term_source
        self.url = url
        super().__init__(
            self.storage.store,
            int(settings.startup_quorum or 0),
            record=self._record,
            save_term=self.storage.save_term,
            broadcast=self._broadcast,
            granted_term=granted_term,
            deposed=deposed,
        )
        rng = rng or random.Random()
        self.delays = DelayModel(settings.min_delay_ms, settings.max_delay_ms, rng)
        secret = settings.replication_secret
        tls = client_context(settings)
        self.make_client = client_factory or (
            lambda url: follower_client(url, secret, MAX_IN_FLIGHT_PER_FOLLOWER, tls)
        )
        self.replicator = Replicator([])
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self.ready_at: float | None = None
        self.startup_error: str | None = None
        """Why the start-up read ended without making this leader ready (an exception)."""
        self.write_stats = WriteStats()
        # Watchers of confirmations (the /ui page); nobody watching costs one check.
        self.delivery_watchers: list[Callable[[Delivery, Entry], None]] = []
        self._startup_task: asyncio.Task[None] | None = None

    def open(self, clients: dict[str, httpx.AsyncClient]) -> None:
        """Replay the log, and read followers' entries (through `clients`) in the background."""
        self._log_configuration()
        if self.owns_storage:
            self.storage.open()
            self.changes.start_at(self.store.last_version, self.store.last_version)
        self.startup.persisted_term, _ = self.storage.load_term()
        self.replicator.links = [
            FollowerLink(
                url,
                clients[url],
                self.delays,
                FollowerProgress(self.store.snapshot, self.settings.max_replication_queue),
                leader=self,
                max_in_flight=MAX_IN_FLIGHT_PER_FOLLOWER,
                heartbeat_timeout=self.settings.heartbeat_timeout_ms / 1000,
            )
            for url in self.settings.followers
        ]
        self._startup_task = asyncio.create_task(self._start_up(), name="leader-start-up")
        self._startup_task.add_done_callback(self._started_up)

    def _started_up(self, task: asyncio.Task[None]) -> None:
        """An exception in the start-up read is logged and kept (an elected leader steps down
        on it, see :meth:`cannot_lead`), never left in a task nobody awaits."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        self.startup_error = f"{type(error).__name__}: {error}"
        log.error("the start-up read failed; this leader will never take writes",
                  exc_info=error)  # fmt: skip

    def _log_configuration(self) -> None:
        settings, n = self.settings, len(self.settings.followers)
        if settings.write_quorum is None and n < 3:
            log.warning("WRITE_QUORUM is not set; with %d follower(s) it defaults to %d", n, n)
        elected = self.startup.granted_term is not None  # its term comes from etcd: unique
        if settings.data_dir is None and n and 2 * self.startup.quorum <= n and not elected:
            log.warning(
                "STARTUP_QUORUM is %d of %d followers and there is no DATA_DIR: if every follower "
                "this leader reads at start-up was away for all of the previous leader's life, it "
                "may reuse that leader's term (see docs/concepts/durability.md); set DATA_DIR, "
                "or STARTUP_QUORUM above %d, to rule that out",
                self.startup.quorum,
                n,
                n // 2,
            )
        log.info(
            "leader replicating to %d follower(s), write quorum %d, startup quorum %d, "
            "delay %g..%g ms",
            n,
            settings.quorum,
            self.startup.quorum,
            settings.min_delay_ms,
            settings.max_delay_ms,
        )

    async def _start_up(self) -> None:
        with bulk_load():
            while True:
                try:
                    await self.replicator.gather(self.startup, leader_id=self.leader_id)
                    break
                except TermTooLowError as low:
                    if self.term_source is None:
                        raise
                    log.warning("%s; asking for a newer one", low)
                    self.startup.granted_term = await self.term_source(low.needed)
            adopted = len(self.startup.adopted_keys)
            reports = self.finish_startup()
        now = time.monotonic()
        for link in self.replicator.links:
            if link.url in reports:
                node_id, in_sync = reports[link.url]
                link.progress.adopt(node_id, in_sync, now)
        self.ready_at = time.monotonic()
        self.ready_after_s = self.ready_at - self.started_at
        self.replicator.start()
        log.info(
            "ready in %.2f s: read %d of %d followers (STARTUP_QUORUM %d), took %d newer "
            "entries; term %d, next version %d",
            self.ready_after_s,
            self.startup.heard,
            len(self.settings.followers),
            self.startup.quorum,
            adopted,
            self.term,
            self.store.next_version(),
        )

    async def close(self) -> None:
        if self._startup_task is not None:
            self._startup_task.cancel()
            await asyncio.gather(self._startup_task, return_exceptions=True)
        await self.replicator.close(STEPPED_DOWN)
        if self.owns_storage:
            await self.storage.close()

    @property
    def applied_through(self) -> int:
        return self.store.last_version

    @property
    def leader_url(self) -> str | None:
        return self.url  # this is the leader: its own URL where known (HA), else None

    @property
    def leader_name(self) -> str | None:
        return self.settings.name

    def refusal(self) -> str | None:
        """Why this node may not acknowledge a write now: not (or no longer) the leader."""
        if self.authority is None:
            return None
        return self.authority.refusal(time.monotonic())

    def cannot_lead(
        self, now: float, check_quorum_s: float, startup_timeout_s: float
    ) -> str | None:
        """Why an elected leader must step down though it holds the lease, or None.

        Before it is ready: its start-up read failed, or made no progress (no page read, no
        term recorded) for `startup_timeout_s`. After: check-quorum (kv/core/contact.py),
        it has not heard from WRITE_QUORUM followers for `check_quorum_s`."""
        if self.startup_error is not None:
            return f"the start-up read failed ({self.startup_error})"
        if self.ready_at is None:
            stalled = now - max(self.started_at, self.startup.progressed_at)
            if stalled <= startup_timeout_s:
                return None
            return (
                f"the start-up read made no progress for {stalled:.1f} s (STARTUP_TIMEOUT_MS): "
                f"{self.startup.waiting_reason(len(self.settings.followers))}"
            )
        heard = [link.progress.last_heard for link in self.replicator.links]
        return quorum_lost(heard, self.settings.quorum, now, check_quorum_s, self.ready_at)

    def primary_reason(self) -> str | None:
        """Why this node is not the primary HAProxy should send writes to; None if it is."""
        return self.refusal() or self.waiting_reason()

    def delivered(self, delivery: Delivery, entry: Entry) -> None:
        for watcher in self.delivery_watchers:
            watcher(delivery, entry)

    def _record(self, entries: Sequence[Entry]) -> None:
        """Every entry the leader applies: to its log, its change feed, and waiting readers."""
        self.storage.record(entries)
        self._feed(entries)
        self.gate.notify()

    def _feed(self, entries: Sequence[Entry]) -> None:
        # Adopted entries (from a late follower) are below the watermark already released:
        # they go out at once, late rather than never.
        feed = self.changes
        if isinstance(entries, StoreView) and len(entries) > feed.capacity and not feed.subscribers:
            # A start-up's million adopted keys: the ring keeps only the newest, and one
            # more tells it where what it keeps begins (its compacted_through).
            entries = entries.newest(feed.capacity + 1)
        late = [e for e in entries if e.version <= feed.released_through]
        feed.received(entries, self.store.last_version)
        if late:
            feed.release_late(late)

    def waiting_reason(self) -> str | None:
        """Why writes are refused outright: the start-up read is not done, or the lease is
        gone."""
        return self.not_ready_reason(len(self.settings.followers)) or self.refusal()

    def unready_reason(self) -> str | None:
        """Why `/ready` is 503: still starting, or too few followers reachable for a write
        at the default quorum to succeed."""
        if (reason := self.waiting_reason()) is not None:
            return reason
        reachable, quorum = self.replicator.confirmable(), self.settings.quorum
        if reachable < quorum:
            return (
                f"only {reachable} of {len(self.settings.followers)} followers are reachable "
                f"and WRITE_QUORUM is {quorum}: writes at the default quorum would fail"
            )
        return None

    def replicate(self, entry: Entry, started_at: float) -> list[asyncio.Future[Delivery]]:
        """Hand `entry` to every follower's delivery loop: one future each."""
        return self.replicator.broadcast(entry, started_at)

    def _broadcast(self, entry: Entry) -> None:
        """Send an entry no client waits for (adopted from a late follower, or restamped)."""
        self.replicator.broadcast(entry, time.monotonic())
