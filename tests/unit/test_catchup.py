"""How much of the store a follower behind the leader is sent again: the leader's entries
from the first that differs from the follower's, in version order, read page by page."""

from kv.core.catchup import CommonPrefix
from kv.core.progress import FollowerProgress
from kv.core.records import Entry
from kv.core.store import StoreView, VersionedStore

from .test_outbox import shipment


def stores(shared: int) -> tuple[VersionedStore, VersionedStore]:
    """A leader and a follower that both hold keys k0..k{shared-1}, written in turn."""
    leader, follower = VersionedStore(), VersionedStore()
    for i in range(shared):
        follower.maybe_apply(leader.put(f"k{i}", i))
    return leader, follower


def pulled(prefix: CommonPrefix, follower: VersionedStore, page: int = 3) -> None:
    after = 0
    while entries := follower.page(after, page):
        prefix.read(entries)
        after = entries[-1].version


def keys(entries: list[Entry] | StoreView) -> list[tuple[str, int]]:
    return [(e.key, e.version) for e in entries]


def test_a_follower_that_missed_the_newest_writes_is_sent_only_those():
    leader, follower = stores(10)
    leader.put("k3", "again")  # version 11, while the follower was away
    leader.put("new", 1)  # 12
    for snapshot in (leader.snapshot(), leader.entries()):
        prefix = CommonPrefix(snapshot)
        pulled(prefix, follower)
        # k3 moved to the end of the leader's order: the prefix ends where k3 was.
        assert prefix.length == 3
        rest = prefix.rest()
        assert keys(rest)[:2] == [("k4", 5), ("k5", 6)]
        assert keys(rest)[-2:] == [("k3", 11), ("new", 12)]
    assert isinstance(CommonPrefix(leader.snapshot()).rest(), StoreView)  # still read lazily


def test_stores_that_agree_leave_nothing_to_send():
    leader, follower = stores(7)
    prefix = CommonPrefix(leader.snapshot())
    pulled(prefix, follower)
    assert prefix.length == 7 and len(prefix.rest()) == 0


def test_an_empty_follower_is_sent_everything():
    leader, _ = stores(5)
    prefix = CommonPrefix(leader.snapshot())
    pulled(prefix, VersionedStore())
    assert prefix.length == 0 and keys(prefix.rest()) == keys(leader.entries())


def test_a_follower_holding_a_write_the_leader_lacks_ends_the_prefix_there():
    leader, follower = stores(6)
    follower.maybe_apply(Entry.create("k2", "from an older leader", 100))
    prefix = CommonPrefix(leader.snapshot())
    pulled(prefix, follower)
    assert prefix.length == 2  # k0, k1; then the follower's k3 where the leader has k2


def test_a_key_the_leader_rewrites_during_the_read_is_sent_again():
    """The leader's snapshot is the one when the read began, looked up as each page comes:
    a key rewritten since no longer matches, so it errs towards sending more."""
    leader, follower = stores(6)
    prefix = CommonPrefix(leader.snapshot())
    prefix.read(follower.page(0, 2))  # k0, k1
    leader.put("k3", "meanwhile")
    prefix.read(follower.page(2, 10))
    assert prefix.length == 3


def test_a_follower_that_restarts_during_the_read_is_measured_again():
    leader, follower = stores(4)
    prefix = CommonPrefix(leader.snapshot())
    prefix.read(follower.page(0, 10))
    assert prefix.length == 4
    prefix.restart()
    pulled(prefix, VersionedStore())  # back empty
    assert prefix.length == 0


def test_a_pull_resyncs_with_the_suffix_unless_the_queue_overflowed_meanwhile():
    leader, follower = stores(50)
    leader.put("late", 1)
    progress = FollowerProgress(leader.snapshot, max_backlog=1_000)
    prefix = progress.begin_pull()
    pulled(prefix, follower)
    progress.handle_pulled("node", in_sync=False, now=0.0, prefix=prefix)
    assert progress.resyncs == 1 and progress.resync_entries == 1  # only "late"

    overflowing = FollowerProgress(leader.snapshot, max_backlog=2)
    prefix = overflowing.begin_pull()
    pulled(prefix, follower)
    overflowing.queue(shipment(100, ready_at=0.0))
    overflowing.queue(shipment(101, ready_at=0.0))
    overflowing.queue(shipment(102, ready_at=0.0))  # the backlog overflows: a full snapshot
    overflowing.handle_pulled("node", in_sync=False, now=0.0, prefix=prefix)
    assert overflowing.resyncs == 2
    assert overflowing.outbox.snapshot_left == len(leader), "the whole store, not the suffix"
