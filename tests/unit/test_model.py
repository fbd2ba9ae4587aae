"""A model-based test of the replication core, with Hypothesis's stateful testing.

The real rules (LeaderCore, FollowerCore, FollowerProgress, the store) run in one
process, joined by a simulated network that Hypothesis controls: it writes and
deletes at any w, delivers batches, leaves batches on the wire and delivers them
later (reordered, duplicated, from dead leaders), freezes and thaws followers,
restarts them with or without their memory, and kills the leader, which restarts
with its log, with its log's tail lost, or with nothing. After every step it checks:

* no version is ever held with two different writes, anywhere (so none was
  assigned twice), unless two leaders began the same term, which only a lost memory
  allows: a starting leader chooses a term above every term the followers it reads have
  seen, and the only follower to know the last one may be the one that lost its disk.
  The merge's restamp rule and the fence on each term's leader_id are what then keep
  replicas apart from the other leader's writes, and quiescence checks they converge;
* while the leader takes writes, it holds every write acknowledged at the
  configured quorum whose confirming followers kept their memory;
* at quiescence (everything thawed and delivered), the leader holds every write a
  surviving confirming follower holds, a deleted key stays deleted unless written
  again, and every replica equals the leader.

Runs are derandomized, so a run replays exactly; KV_MODEL_EXAMPLES asks for more.
"""

import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kv.core.outbox import Shipment
from kv.core.progress import Confirmation, FollowerProgress
from kv.core.records import Entry, term_of
from kv.core.store import VersionedStore, fingerprint
from kv.follower.node import FollowerCore, Refused
from kv.leader.node import LeaderCore
from kv.settings import default_startup_quorum

N = 3
KEYS = ["a", "b", "c"]
PAGE = 2  # small, so that reads take several pages


@dataclass
class Follower:
    core: FollowerCore = field(default_factory=FollowerCore)
    frozen: bool = False


@dataclass
class Write:
    key: str
    version: int
    deleted: bool
    confirmers: set[int] = field(default_factory=set)


@dataclass
class StaleBatch:
    """A batch left on the wire: delivered later, perhaps twice, perhaps after its leader died."""

    follower: int
    term: int
    leader_id: str
    entries: tuple[Entry, ...]


class Leader:
    """One leader incarnation: LeaderCore and a FollowerProgress per follower."""

    def __init__(self, log: list[Entry], term_file: int, max_backlog: int, quorum: int) -> None:
        store = VersionedStore()
        for entry in log:
            store.maybe_apply(entry)
        self.log = list(log)
        self.term_file = term_file
        self.core = LeaderCore(
            store,
            default_startup_quorum(N, quorum),
            persisted_term=term_file,
            record=self.log.extend,
            save_term=self._save_term,
            broadcast=self.broadcast,
        )
        self.progress = [FollowerProgress(store.entries, max_backlog) for _ in range(N)]

    def _save_term(self, term: int, _: str) -> None:
        self.term_file = term

    def broadcast(self, entry: Entry, waiter: object = None) -> None:
        for progress in self.progress:
            # On overflow the snapshot carries it, and its waiter is never confirmed.
            progress.queue(Shipment(entry, 0.0, 0.0, 0.0, waiter=waiter))


class ReplicationModel(RuleBasedStateMachine):
    W = 2  # the configured write quorum; the start-up quorum is N - W + 1

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.followers = [Follower() for _ in range(N)]
        self.leader = Leader([], 0, max_backlog=3, quorum=self.W)
        self.writes: list[Write] = []
        self.wiped: dict[int, int] = {i: 0 for i in range(N)}  # follower -> wipe count
        self.confirm_epoch: dict[tuple[int, int], int] = {}  # (write, follower) -> wipes then
        self.stale: list[StaleBatch] = []
        self.versions: dict[int, tuple[str, object, bool]] = {}
        self.term_leaders: dict[int, set[str]] = {}  # term -> every leader_id that began it
        self.memory_lost = False  # a follower wiped, or a leader back without all its log

    # -- helpers ---------------------------------------------------------------------

    def tick(self) -> float:
        self.now += 1.0  # past every heartbeat interval and backoff
        return self.now

    def reachable(self, i: int) -> bool:
        return not self.followers[i].frozen

    def read_all(self, i: int, term: int | None) -> Refused | list[Entry]:
        """Read every page of follower i, as a leader does; the entries, or the refusal."""
        core = self.followers[i].core
        after, found = 0, []
        while True:
            page = core.handle_read(after, PAGE, term, self.leader.core.leader_id)
            if isinstance(page, Refused):
                return page
            found += page.entries
            if page.next_after is None:
                return found
            after = page.next_after

    def startup_read(self, i: int) -> None:
        """The starting leader reads follower i; with enough read, it claims its new term on
        them, as Replicator.gather does, and takes writes once enough hold it."""
        leader = self.leader
        startup = leader.core.startup
        if leader.core.ready:
            return
        if str(i) not in startup.reports and self.reachable(i):
            entries = self.read_all(i, None)
            assert isinstance(entries, list)
            core = self.followers[i].core
            startup.merge_page(str(i), entries)
            startup.finish(str(i), core.node_id, core.fence.term, core.store.last_version)
        if not startup.read_enough:
            return
        term = startup.choose_term()
        for url in [u for u in startup.reports if u not in startup.claims]:
            if not self.reachable(int(url)):
                startup.forget(url)
                continue
            core = self.followers[int(url)].core
            answer = core.handle_read(0, 1, term, leader.core.leader_id)
            if isinstance(answer, Refused):
                startup.observe(answer.follower_term)
                startup.forget(url)
            else:
                startup.claimed(url, term)
        if startup.ready:
            reports = leader.core.finish_startup()
            for url, (node_id, in_sync) in reports.items():
                leader.progress[int(url)].adopt(node_id, in_sync, self.now)

    def round_trip(self, i: int, leave_on_wire: bool = False, meanwhile: str | None = None) -> bool:
        """One exchange between the leader and follower i; True if anything was sent. If it
        reads the follower's entries, a write of `meanwhile` lands after the first page."""
        leader, now = self.leader, self.tick()
        progress, follower = leader.progress[i], self.followers[i]
        if not leader.core.ready:
            return False
        if progress.wants_pull(now):
            if not self.reachable(i):
                progress.handle_pull_failure(now, "frozen")
                return True
            pulled = self.read_all(i, leader.core.term)
            if isinstance(pulled, Refused):
                leader.core.observe_term(pulled.follower_term, foreign=True)
                return True
            prefix = progress.begin_pull()
            for start in range(0, len(pulled), PAGE):
                prefix.read(pulled[start : start + PAGE])
                leader.core.merge(pulled[start : start + PAGE])
                if start == 0 and meanwhile is not None:
                    self.write(meanwhile, -len(self.writes))  # taken while the read goes on
            in_sync = leader.core.in_sync(fingerprint(follower.core.store.entries()))
            progress.handle_pulled(follower.core.node_id, in_sync, now, prefix)
            return True
        batch = progress.next_batch(now, 1)
        if batch is None:
            return False
        progress.sending(batch, now)
        entries = [s.entry for s in batch]
        if leave_on_wire or not self.reachable(i):
            if leave_on_wire:
                term, leader_id = leader.core.term, leader.core.leader_id
                self.stale.append(StaleBatch(i, term, leader_id, tuple(entries)))
            progress.handle_failure(batch, now, "no answer")
            return True
        outcome = follower.core.handle_replicate(leader.core.term, leader.core.leader_id, entries)
        if isinstance(outcome, Refused):
            leader.core.observe_term(outcome.follower_term, foreign=True)
            progress.handle_fenced(batch, now, outcome.reason)
            return True
        confirmation = Confirmation(follower.core.node_id, follower.core.store.last_version)
        progress.handle_success(batch, confirmation, now)
        if outcome.unconfirmed:
            progress.handle_conflict()
        for shipment in batch:
            if shipment.waiter is not None and shipment.entry.version not in outcome.unconfirmed:
                write = self.writes[shipment.waiter]
                write.confirmers.add(i)
                self.confirm_epoch[(shipment.waiter, i)] = self.wiped[i]
        return True

    def surviving_confirmers(self, index: int) -> set[int]:
        write = self.writes[index]
        return {i for i in write.confirmers if self.confirm_epoch.get((index, i)) == self.wiped[i]}

    # -- rules -----------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        for i in range(N):
            self.startup_read(i)

    @precondition(lambda self: self.leader.core.ready)
    @rule(key=st.sampled_from(KEYS), value=st.integers(0, 9))
    def write(self, key: str, value: int) -> None:
        entry = self.leader.core.put(key, value)
        self.writes.append(Write(key, entry.version, False))
        self.leader.broadcast(entry, waiter=len(self.writes) - 1)

    @precondition(lambda self: self.leader.core.ready)
    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: str) -> None:
        entry = self.leader.core.delete(key)
        if entry is not None:
            self.writes.append(Write(key, entry.version, True))
            self.leader.broadcast(entry, waiter=len(self.writes) - 1)

    @rule(
        i=st.integers(0, N - 1),
        on_wire=st.booleans(),
        meanwhile=st.none() | st.sampled_from(KEYS),
    )
    def deliver(self, i: int, on_wire: bool, meanwhile: str | None = None) -> None:
        self.round_trip(i, leave_on_wire=on_wire, meanwhile=meanwhile)

    @rule(i=st.integers(0, N - 1))
    def startup(self, i: int) -> None:
        self.startup_read(i)

    @precondition(lambda self: self.stale)
    @rule(data=st.data(), keep=st.booleans())
    def deliver_stale(self, data: st.DataObject, keep: bool) -> None:
        index = data.draw(st.integers(0, len(self.stale) - 1))
        batch = self.stale[index] if keep else self.stale.pop(index)
        follower = self.followers[batch.follower]
        if not follower.frozen:
            follower.core.handle_replicate(batch.term, batch.leader_id, list(batch.entries))

    @rule(i=st.integers(0, N - 1))
    def freeze(self, i: int) -> None:
        self.followers[i].frozen = True

    @rule(i=st.integers(0, N - 1))
    def thaw(self, i: int) -> None:
        self.followers[i].frozen = False

    @rule(i=st.integers(0, N - 1), wipe=st.booleans())
    def restart_follower(self, i: int, wipe: bool) -> None:
        old = self.followers[i].core
        if wipe:
            core = FollowerCore()
            self.wiped[i] += 1
            self.memory_lost = True
        else:
            store = VersionedStore()
            for entry in old.store.entries():
                store.maybe_apply(entry)
            store.advance_to(old.store.last_version)
            core = FollowerCore(store, type(old.fence)(old.fence.term, old.fence.leader_id))
        self.followers[i] = Follower(core)
        # Its connections died with it: nothing on the wire reaches the new process.
        self.stale = [b for b in self.stale if b.follower != i]

    @rule(keep_log=st.booleans(), lost_tail=st.integers(0, 3))
    def restart_leader(self, keep_log: bool, lost_tail: int) -> None:
        old = self.leader
        log = old.log[: max(0, len(old.log) - lost_tail)] if keep_log else []
        self.memory_lost |= not keep_log or (lost_tail > 0 and bool(old.log))
        self.leader = Leader(log, old.term_file if keep_log else 0, max_backlog=3, quorum=self.W)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def no_version_is_held_with_two_writes(self) -> None:
        core = self.leader.core
        if core.ready:
            self.term_leaders.setdefault(core.term, set()).add(core.leader_id)
        reused = {term for term, leaders in self.term_leaders.items() if len(leaders) > 1}
        assert not reused or self.memory_lost, f"terms {reused} begun twice with no memory lost"
        stores = [core.store, *(f.core.store for f in self.followers)]
        batches = [e for b in self.stale for e in b.entries]
        for entry in [e for s in stores for e in s.entries()] + batches:
            if term_of(entry.version) in reused:
                continue
            content = (entry.key, entry.value, entry.deleted)
            seen = self.versions.setdefault(entry.version, content)
            assert seen == content, f"version {entry.version} holds {seen} and {content}"

    @invariant()
    def a_ready_leader_holds_every_write_acknowledged_at_the_quorum(self) -> None:
        if not self.leader.core.ready:
            return
        store = self.leader.core.store
        for index, write in enumerate(self.writes):
            confirmers = write.confirmers
            if len(confirmers) >= self.W and self.surviving_confirmers(index) == confirmers:
                held = store.held(write.key)
                assert held is not None and held.version >= write.version, (
                    f"{write} acknowledged at W={self.W} is missing on the leader: {held}"
                )

    # -- quiescence ------------------------------------------------------------------------

    @rule()
    def quiesce(self) -> None:
        for follower in self.followers:
            follower.frozen = False
        for batch in self.stale:
            self.followers[batch.follower].core.handle_replicate(
                batch.term, batch.leader_id, list(batch.entries)
            )
        self.stale.clear()
        for i in range(N):
            self.startup_read(i)
        for _ in range(500):
            busy = False
            for i in range(N):
                progress = self.leader.progress[i]
                busy = busy or progress.needs_pull or len(progress.outbox) > 0
                self.round_trip(i)
                busy = busy or progress.needs_pull or len(progress.outbox) > 0
            if not busy:
                break
        else:
            pytest.fail("the cluster did not quiesce")
        self.check_quiescent()

    def check_quiescent(self) -> None:
        leader = self.leader.core.store
        want = {e.key: (e.version, e.value, e.deleted) for e in leader.entries()}
        for i, follower in enumerate(self.followers):
            have = {e.key: (e.version, e.value, e.deleted) for e in follower.core.store.entries()}
            assert have == want, f"follower {i} differs from the leader: {have} != {want}"
        for index, write in enumerate(self.writes):
            if self.surviving_confirmers(index):
                held = leader.held(write.key)
                assert held is not None and held.version >= write.version, (
                    f"{write} was confirmed by a follower that kept it, yet is lost"
                )


class AllFollowersModel(ReplicationModel):
    """W = N: a starting leader reads a single follower, so two leaders' read sets can miss
    each other entirely (every follower that heard the first was away when the second began).
    Only the leader's own term file (DATA_DIR) then keeps terms unique, so here the leader
    always restarts with its log (whose tail may still be lost)."""

    W = N

    @rule(lost_tail=st.integers(0, 3))
    def restart_leader(self, keep_log: bool = True, lost_tail: int = 0) -> None:  # type: ignore[override]
        super().restart_leader(True, lost_tail)


class OneFollowerModel(ReplicationModel):
    W = 1


def test_without_a_leader_log_a_small_startup_quorum_can_reuse_a_term():
    """The sequence the W = N model excludes, pinned: documented in docs/concepts/durability.md."""
    model = AllFollowersModel()
    model.start()
    model.write("a", 0)
    model.deliver(0, False)
    model.no_version_is_held_with_two_writes()  # as after every step: notes the leader
    ReplicationModel.restart_leader(model, keep_log=False, lost_tail=0)
    model.freeze(0)
    model.startup(1)  # reads follower 1 alone, which never heard of term 1
    assert model.leader.core.term == 1
    model.no_version_is_held_with_two_writes()
    model.write("a", 1)
    old, new = model.followers[0].core.store.held("a"), model.leader.core.store.held("a")
    assert old is not None and new is not None
    assert (old.version, old.value) == (1, 0) and (new.version, new.value) == (1, 1)
    model.no_version_is_held_with_two_writes()  # which allows it: two leaders began term 1
    assert len(model.term_leaders[1]) == 2 and model.memory_lost
    model.quiesce()  # and the replicas still converge


def test_with_its_term_file_a_restarted_leader_never_reuses_a_term():
    model = AllFollowersModel()
    model.start()
    model.write("a", 0)
    model.deliver(0, False)
    model.restart_leader(lost_tail=3)  # the log's tail is lost, the term file is not
    model.freeze(0)
    model.startup(1)
    assert model.leader.core.term == 2
    model.write("a", 1)
    model.no_version_is_held_with_two_writes()
    model.quiesce()


MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("KV_MODEL_EXAMPLES", "80")),
    stateful_step_count=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMajorityQuorum = ReplicationModel.TestCase
TestMajorityQuorum.settings = MODEL_SETTINGS
TestQuorumOfAll = AllFollowersModel.TestCase
TestQuorumOfAll.settings = MODEL_SETTINGS
TestQuorumOfOne = OneFollowerModel.TestCase
TestQuorumOfOne.settings = MODEL_SETTINGS
