"""An HA node: one process that follows or leads, as etcd decides, over one store.

The node serves whichever role app it holds now, follower.py's or leader.py's, both built
around the same :class:`NodeState` (store, log, change feed), so a promotion happens in
place: no new process, nothing replayed, every `/watch` stream kept. One loop runs the HA
cycle (:func:`kv.ha.decide.decide`) every LEASE_RENEW_MS, and at once whenever etcd's watch
reports a change under ETCD_PREFIX:

* **follow**: writes are redirected to the leader named in etcd;
* **campaign**: the key is vacant. A node that cannot reach the peers its start-up read
  needs does not campaign (pre-vote). A follower that is behind waits CAMPAIGN_DELAY_MS per
  better-placed peer, and per peer that did not answer, then creates the leader key on a
  new lease in one transaction that also raises the term counter;
* **promote**: leader.py's app starts on the store as it is, reads N - W peers (itself
  the N-W+1th copy, unless its memory may have lost something: then N - W + 1), with
  etcd's term, which fences each of them as it is read, and only then takes writes;
* **lead**: a second task renews the lease every LEASE_RENEW_MS; writes are acknowledged
  only while the lease clock (kv/ha/lease.py) says so;
* **step down**: the lease ran out, etcd named another leader, a follower refused our
  term, the leader has not heard from WRITE_QUORUM followers for CHECK_QUORUM_MS
  (check-quorum), or its start-up read failed or stalled for STARTUP_TIMEOUT_MS. Writes
  stop at once, the lease is revoked, and the node turns follower with the term it led.

SIGTERM hands over: the leader stops acknowledging and revokes its lease before uvicorn
drains its connections, so a successor is elected at once rather than after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from fastapi import FastAPI

import follower
import leader
from kv.core.records import term_of
from kv.core.startup import TermFence
from kv.follower.service import FollowerService
from kv.ha.coordinator import Clock, Coordinator
from kv.ha.decide import (
    Action,
    Candidate,
    ClusterView,
    LeaderRecord,
    Me,
    Role,
    campaign_delay,
    decide,
    pre_vote,
)
from kv.ha.etcd import Etcd, EtcdError
from kv.ha.lease import LeaseClock, keepalive_timeout
from kv.leader.service import LeaderNode
from kv.network.tls import client_context
from kv.settings import HASettings, promoted_startup_quorum
from kv.storage.log import load_record, save_record
from kv.storage.state import node_state
from kv.web import ui
from kv.web.auth import SECRET_HEADER

log = logging.getLogger("kvstore.ha")

PEER_TIMEOUT_S = 0.25
"""How long a campaigning node waits for a peer to say how up to date it is."""
ELECTIONS_KEPT = 50
LEASES_FILE = "leases.json"
"""In DATA_DIR: the leases this node was granted, so a restarted process revokes its own."""
LEASES_KEPT = 8


@dataclass(frozen=True, slots=True)
class Election:
    """A change of leader, as this node saw it: shown by `GET /ha` and the live page."""

    at: float
    """Unix time at which this node saw the new leader."""
    term: int
    leader: str
    vacant_s: float | None
    """How long this node saw no leader before this one (None: it never saw the gap)."""


class HANode:
    """One node of an HA cluster; see the module docstring."""

    def __init__(
        self,
        settings: HASettings,
        coordinator: Coordinator | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """`coordinator`: etcd unless given (tests pass kv.ha.coordinator's in-memory one)."""
        self.settings = settings
        self.name = str(settings.node_name)
        self.url = settings.url
        self.clock = clock
        self.state = node_state(settings)
        self.etcd: Coordinator = coordinator or Etcd(
            settings.etcd_endpoints, settings.etcd_prefix, self.name, client_context(settings)
        )
        self.lease = LeaseClock(settings.lease_margin_ms / 1000)
        self.lease_id: int | None = None
        self.earlier_leases: list[int] = []
        """Leases granted to this node (this process's, and DATA_DIR's record of earlier ones):
        the only ones it ever revokes on finding the leader key names it."""
        self.memory_vouched = False
        """This process has held everything acknowledged so far: it led after a complete
        start-up read, or a leader vouched for what it holds (applied_through > 0)."""
        self.stepped_down_because: str | None = None
        self._read_first: list[str] = []
        """Peers that answered the last campaign's GET /ha, best placed first."""
        self.stale_lease: int | None = None
        """A lease this node held when it could not revoke it: revoked once etcd answers."""
        self.leader_config = settings.leader_settings()
        self.follower_config = settings.follower_settings()
        self.role = Role.FOLLOWER
        self.app: FastAPI | None = None
        self.leader_node: LeaderNode | None = None
        self.follower_node: FollowerService | None = None
        self.leader: LeaderRecord | None = None
        self.term = 0
        self.sentence = "starting"
        self.etcd_error: str | None = None
        self.etcd_errors: Counter[str] = Counter()
        self.leader_changes = 0
        self.elections: deque[Election] = deque(maxlen=ELECTIONS_KEPT)
        self.routers: list[Any] = []
        self.collectors: list[Any] = []
        self._vacant_since: float | None = None
        self._role_exit: AsyncExitStack | None = None
        self._switching = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._keeper: asyncio.Task[None] | None = None
        self._hand_over: asyncio.Task[None] | None = None
        # Peers' /ha: with the secret, which opens it while AUTH_FILE is set (kv/web/access.py).
        self._peers = httpx.AsyncClient(
            timeout=PEER_TIMEOUT_S,
            trust_env=False,
            verify=client_context(settings) or True,
            headers={SECRET_HEADER: settings.replication_secret},
        )

    # -- what the role apps ask (kv.follower.service.Election) ------------------------

    @property
    def leader_url(self) -> str | None:
        return None if self.leader is None else self.leader.url

    @property
    def leader_name(self) -> str | None:
        return None if self.leader is None else self.leader.name

    def no_leader_reason(self) -> str:
        if self.etcd_error:
            return f"{self.etcd_error}: no leader can be elected until it answers; retry shortly"
        why = f"this node {self.stepped_down_because}; " if self.stepped_down_because else ""
        return f"{why}no leader is known: an election is under way; retry shortly"

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER and self.lease.valid(self.clock())

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Replay the log, serve as a follower, and start the HA loop and etcd's watch."""
        await self.open()
        self._tasks = [
            asyncio.create_task(self._cycle_loop(), name="ha-cycle"),
            asyncio.create_task(self.etcd.watch(self._wake.set), name="ha-watch"),
        ]

    async def open(self) -> None:
        """Replay the log and serve as a follower, with no loop yet (tests run the cycles)."""
        storage = self.state.storage
        storage.open()
        self.state.changes.start_at(storage.store.last_version, 0)
        term, leader_id = storage.load_term()
        self.term = term
        if storage.data_dir is not None:
            record = load_record(storage.data_dir, LEASES_FILE) or {}
            self.earlier_leases = [int(lease) for lease in record.get("leases", [])]
        log.info(
            "HA node %s at %s; etcd at %s; write quorum %d of %d followers; lease %d s",
            self.name,
            self.url,
            self.etcd.where,
            self.leader_config.quorum,
            len(self.settings.peers),
            self.settings.lease_ttl_s,
        )
        # Without DATA_DIR the fence starts empty: batches wait until etcd says the term.
        await self._become_follower(TermFence(term, leader_id), learn_term=not storage.data_dir)

    def begin_hand_over(self) -> None:
        """SIGTERM: hand leadership over now, before uvicorn drains its connections."""
        if self._hand_over is None:
            self._hand_over = asyncio.create_task(self.hand_over(), name="ha-hand-over")

    async def hand_over(self) -> None:
        if self.role is not Role.LEADER:
            return
        self.lease.lose("this node is handing leadership over (it is stopping)")
        await self._release_lease(timeout=0.5)
        self.leader = None
        self._set_sentence("handed over: revoked the leader key's lease, so a follower can lead")

    async def stop(self) -> None:
        self.begin_hand_over()
        assert self._hand_over is not None
        await asyncio.gather(self._hand_over, return_exceptions=True)
        for task in [*self._tasks, self._keeper]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._role_exit is not None:
            await self._role_exit.aclose()
        await self.state.storage.close()
        await self.etcd.aclose()
        await self._peers.aclose()

    # -- the loop -------------------------------------------------------------------------

    async def _cycle_loop(self) -> None:
        period = self.settings.lease_renew_ms / 1000
        while True:
            self._wake.clear()
            try:
                sentence = await self.run_cycle()
            except Exception as exc:  # the loop must outlive any one cycle
                log.exception("HA cycle failed")
                sentence = f"HA cycle failed: {exc!r}"
            self._set_sentence(sentence)
            try:
                async with asyncio.timeout(period):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _set_sentence(self, sentence: str) -> None:
        if sentence != self.sentence:
            log.info("%s", sentence)
            self.sentence = sentence

    async def run_cycle(self) -> str:
        """Read etcd once, decide, act; return the sentence that says what was done."""
        view: ClusterView | None
        try:
            view = await self.etcd.read()
            self.etcd_error = None
        except EtcdError as exc:
            self.etcd_errors["read"] += 1
            self.etcd_error = str(exc)
            view = None
        if view is not None and self.stale_lease is not None:
            await self._revoke_stale()
            return "revoked the lease this node held before etcd became unreachable"
        if view is not None:
            self._observe(view)
            if self.follower_node is not None:
                self.follower_node.learn_term(view.term)
        me = Me(
            self.name,
            self.role,
            self.lease_id,
            self.lease.valid(self.clock()),
            self.settings.failover_priority,
            cannot_lead=self._cannot_lead(),
            earlier_leases=frozenset(self.earlier_leases),
        )
        decision = decide(view, me, self.etcd_error or "")
        match decision.action:
            case Action.LEAD:
                if view is not None and view.leader is None:
                    self.leader = None
            case Action.WAIT:
                # No leader, or a key naming this node on a lease it never held: no one to
                # redirect writes to.
                if view is not None and (view.leader is None or view.leader.name == self.name):
                    self.leader = None
            case Action.FOLLOW:
                self.leader = decision.leader
                self.stepped_down_because = None
            case Action.STEP_DOWN:
                await self.step_down(decision.sentence, decision.leader)
            case Action.RELEASE:
                assert decision.leader is not None
                try:
                    await self.etcd.revoke(decision.leader.lease)
                except EtcdError as exc:
                    self.etcd_errors["revoke"] += 1
                    return f"could not revoke an earlier process's lease: {exc}"
                self._wake.set()
            case Action.CAMPAIGN:
                assert view is not None
                return await self.campaign(view)
        return decision.sentence

    def _observe(self, view: ClusterView) -> None:
        """Note a change of leader (for /ha, the page and kv_leader_changes_total)."""
        now = self.clock()
        record = view.leader
        self.term = max(self.term, view.term)
        if record is None:
            if self._vacant_since is None:
                self._vacant_since = now
            return
        known = self.elections[-1] if self.elections else None
        if known is None or (known.term, known.leader) != (record.term, record.name):
            vacant = None if self._vacant_since is None else round(now - self._vacant_since, 3)
            self.elections.append(Election(time.time(), record.term, record.name, vacant))
            if known is not None:
                self.leader_changes += 1
        self._vacant_since = None

    # -- campaigning ----------------------------------------------------------------------

    async def campaign(self, view: ClusterView) -> str:
        self.leader = None
        me, answers = await self._ask_peers()
        reached = [a.name for a in answers.values() if a is not None]
        # Read first, if promoted, the peers that just answered, the best placed first: a
        # dead or cut-off peer would cost the start-up read a stall before the next is tried.
        answered = sorted((a for a in answers.values() if a is not None), key=Candidate.rank)
        self._read_first = [a.name for a in reversed(answered)]
        refusal = pre_vote(reached, self.startup_reads(), len(self.settings.peers))
        if refusal is not None:
            return refusal
        # The node that led last is not waited for, answering or not: it lost the key (cut
        # off from etcd, its lease run out, or stepped down), and its being ahead says only
        # that it led.
        former = self.elections[-1].leader if self.elections else None
        unknown = [name for name, a in answers.items() if a is None and name != former]
        delay, why = campaign_delay(
            me,
            [a for a in answers.values() if a is not None and a.name != former],
            self.settings.campaign_delay_ms / 1000,
            unknown,
        )
        if delay:
            # Cut short when etcd's watch reports a change: a better-placed peer has won.
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            try:
                view = await self.etcd.read()
            except EtcdError as exc:
                return f"waited {delay:.2f} s ({why}), then could not read etcd: {exc}"
            if view.leader is not None:
                self.leader = view.leader
                self._observe(view)
                return f"waited {delay:.2f} s ({why}); {view.leader.name} leads"
        sent = self.clock()
        try:
            lease, ttl = await self.etcd.grant(self.settings.lease_ttl_s)
        except EtcdError as exc:
            self.etcd_errors["grant"] += 1
            return f"could not campaign: {exc}"
        self._remember_lease(lease)
        try:
            record = await self.etcd.campaign(self.url, lease, view, self._term_floor())
        except EtcdError as exc:
            self.etcd_errors["campaign"] += 1
            self.stale_lease = lease
            return f"could not campaign: {exc}"
        if record is None:
            try:
                await self.etcd.revoke(lease)
            except EtcdError:
                self.stale_lease = lease
            self._wake.set()
            return "lost the election: another node created the leader key first"
        self.lease.renewed(sent, ttl)
        self.lease_id = lease
        self.leader = record
        self.term = record.term
        self._observe(ClusterView(record, record.term))
        await self._promote(record)
        waited = f", after waiting {delay:.2f} s ({why})" if delay else ""
        return f"promoted self to leader by acquiring the leader key in term {record.term}{waited}"

    async def _ask_peers(self) -> tuple[Candidate, dict[str, Candidate | None]]:
        """This node as a candidate, and what every peer says of itself (GET /ha): None for a
        peer that did not answer in PEER_TIMEOUT_S (dead, frozen, starting or cut off)."""
        store = self.state.storage.store
        applied = 0 if self.follower_node is None else self.follower_node.applied_through
        me = Candidate(self.name, applied, store.last_version, self.settings.failover_priority)

        async def ask(url: str) -> Candidate | None:
            try:
                body = (await self._peers.get(f"{url}/ha")).json()
                return Candidate(
                    str(body["node_name"]),
                    int(body["applied_through"]),
                    int(body["last_version"]),
                    int(body["failover_priority"]),
                )
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return None

        peers = self.settings.peers
        answers = await asyncio.gather(*(ask(url) for url in peers.values()))
        return me, dict(zip(peers, answers, strict=True))

    def startup_reads(self) -> int:
        """The peers this node's start-up read needs if it is promoted now: N - W, and one
        more when its own memory may lack something it confirmed (no DATA_DIR, or a log
        that came back short), since it then cannot count as a copy itself."""
        peers, quorum = len(self.settings.peers), self.leader_config.quorum
        reads = promoted_startup_quorum(peers, quorum)
        if not self.memory_complete:
            reads = min(reads + 1, max(peers - 1, 0))
        return reads

    @property
    def memory_complete(self) -> bool:
        """Whether this node holds everything it ever confirmed, so it counts as one copy."""
        if self.state.storage.complete or self.memory_vouched:
            return True
        follower = self.follower_node
        return follower is not None and follower.applied_through > 0

    def _remember_lease(self, lease: int) -> None:
        """Record a granted lease, durably with DATA_DIR, before it can carry the key."""
        self.earlier_leases = [*self.earlier_leases, lease][-LEASES_KEPT:]
        data_dir = self.state.storage.data_dir
        if data_dir is not None:
            save_record(data_dir, LEASES_FILE, {"leases": self.earlier_leases})

    def _term_floor(self) -> int:
        """The highest term this node has seen: the campaign's term goes above it too."""
        store = self.state.storage.store
        fence = 0 if self.follower_node is None else self.follower_node.term
        return max(self.term, store.term, term_of(store.last_version), fence)

    async def _raise_term(self, at_least: int) -> int:
        """A peer has seen a term above etcd's counter (etcd lost its data): raise it."""
        assert self.leader is not None
        record = await self.etcd.raise_term(self.leader, at_least)
        self.leader = record
        self.term = record.term
        return record.term

    # -- roles ----------------------------------------------------------------------------

    async def _promote(self, record: LeaderRecord) -> None:
        reads = self.startup_reads()
        if reads != self.leader_config.startup_quorum:
            log.info(
                "this node may lack entries it confirmed (no DATA_DIR, or its log came back "
                "short), so it does not count itself: its start-up read needs %d peers",
                reads,
            )
        peers = self.settings.peers
        first = [peers[name] for name in self._read_first if name in peers]
        followers = first + [url for url in peers.values() if url not in first]
        config = self.leader_config.model_copy(
            update={"startup_quorum": reads, "followers": followers}
        )
        node = LeaderNode(
            config,
            shared=self.state,
            authority=self.lease,
            granted_term=record.term,
            term_source=self._raise_term,
            deposed=self._deposed,
            url=self.url,
        )
        app = leader.create_app(config, node=node, routers=self.routers, collectors=self.collectors)
        self.leader_node, self.follower_node = node, None
        await self._switch(app, Role.LEADER)
        self._keeper = asyncio.create_task(self._keep_lease(), name="ha-lease")

    async def _become_follower(self, fence: TermFence, learn_term: bool = False) -> None:
        node = FollowerService(
            self.follower_config,
            shared=self.state,
            fence=fence,
            election=self,
            learn_term=learn_term,
        )
        app = follower.create_app(
            self.follower_config,
            node=node,
            routers=[*self.routers, ui.router],  # the page: every HA node serves it
            collectors=self.collectors,
        )
        self.leader_node, self.follower_node = None, node
        await self._switch(app, Role.FOLLOWER)

    async def _switch(self, app: FastAPI, role: Role) -> None:
        """Start `app`, serve it from now on, then stop the app it replaces."""
        app.state.ha_status = self.status  # the live page shows the election (kv/web/ui.py)
        app.state.role_node = lambda: self.leader_node or self.follower_node
        async with self._switching:
            stack = AsyncExitStack()
            await stack.enter_async_context(app.router.lifespan_context(app))
            previous, self._role_exit = self._role_exit, stack
            self.app, self.role = app, role
            if previous is not None:
                await previous.aclose()

    def _cannot_lead(self) -> str | None:
        """Why this leader must give the lease up though it holds it (see LeaderNode)."""
        node = self.leader_node
        if node is None or self.role is not Role.LEADER:
            return None
        return node.cannot_lead(
            time.monotonic(), self.settings.check_quorum_s, self.settings.startup_timeout_s
        )

    def _deposed(self, term: int) -> None:
        """A follower refused our term: a newer leader has begun term `term`."""
        self.lease.lose(f"a newer leader has begun term {term}")
        self._wake.set()

    async def step_down(self, reason: str, successor: LeaderRecord | None = None) -> None:
        """Stop acknowledging at once, give up the lease, and follow."""
        if self.role is not Role.LEADER:
            return
        node = self.leader_node
        self.lease.lose(self.etcd_error or reason)
        self.stepped_down_because = reason
        if node is not None and node.ready:
            self.memory_vouched = True  # it held everything acknowledged until now
        await self._release_lease(timeout=0.3)
        # A key that still names this node (its lease ran out) is no leader to redirect to.
        self.leader = successor if successor is not None and successor.name != self.name else None
        fence = TermFence(node.term, node.leader_id) if node is not None else TermFence()
        await self._become_follower(fence)

    async def _release_lease(self, timeout: float) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        lease, self.lease_id = self.lease_id, None
        if lease is None:
            return
        try:
            await self.etcd.revoke(lease, timeout=timeout)
        except EtcdError as exc:
            self.etcd_errors["revoke"] += 1
            self.stale_lease = lease
            log.warning("could not revoke lease %x (%s); will when etcd answers", lease, exc)

    async def _revoke_stale(self) -> None:
        lease = self.stale_lease
        assert lease is not None
        try:
            await self.etcd.revoke(lease)
            self.stale_lease = None
        except EtcdError as exc:
            self.etcd_errors["revoke"] += 1
            log.warning("could not revoke lease %x: %s", lease, exc)
        self._wake.set()

    async def _keep_lease(self) -> None:
        """Renew the lease every LEASE_RENEW_MS (sooner after a failure) while leading."""
        interval = self.settings.lease_renew_ms / 1000
        delay = interval
        while self.lease_id is not None:
            await asyncio.sleep(delay)
            sent = self.clock()
            try:
                timeout = keepalive_timeout(
                    self.lease.remaining(sent), len(self.settings.etcd_endpoints)
                )
                ttl = await self.etcd.keepalive(self.lease_id, timeout=timeout)
            except EtcdError as exc:
                self.etcd_errors["keepalive"] += 1
                self.etcd_error = str(exc)
                self.lease.lost_reason = str(exc)
                if not self.lease.valid(self.clock()):
                    self._wake.set()  # the cycle steps down
                delay = min(interval, 0.1)
                continue
            if ttl <= 0:
                self.lease.lose("etcd no longer knows this node's lease: it expired")
                self._wake.set()
                return
            self.lease.renewed(sent, ttl)
            delay = interval

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `GET /ha` shows: this node, who leads, the lease, and recent elections."""
        now = self.clock()
        store = self.state.storage.store
        applied = (
            store.last_version if self.follower_node is None else self.follower_node.applied_through
        )
        return {
            "node_name": self.name,
            "url": self.url,
            "role": self.role.value,
            "is_leader": self.is_leader,
            "leader_name": self.leader_name,
            "leader_url": self.leader_url,
            "term": max(self.term, self.leader.term if self.leader else 0),
            "lease_ttl_s": self.settings.lease_ttl_s,
            "lease_remaining_s": round(self.lease.remaining(now), 3)
            if self.role is Role.LEADER
            else None,
            "failover_priority": self.settings.failover_priority,
            "applied_through": applied,
            "last_version": store.last_version,
            "etcd_endpoints": self.settings.etcd_endpoints,
            "etcd_error": self.etcd_error,
            "last_action": self.sentence,
            "leader_changes": self.leader_changes,
            "elections": [asdict(e) for e in self.elections],
        }
