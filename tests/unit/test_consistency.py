"""The pieces behind read-your-writes, conditional writes and the change feed, without HTTP."""

import asyncio
import random

import pytest

from kv.core.changes import ChangeFeed
from kv.core.outbox import Outbox, Shipment
from kv.core.progress import Confirmation, FollowerProgress
from kv.core.records import Entry
from kv.core.store import VersionedStore, VersionMismatch
from kv.follower.node import FollowerCore
from kv.leader.node import LeaderCore
from kv.web.consistency import VersionGate
from kv.web.watch import Filter, Subscription


def entry(version: int, key: str | None = None) -> Entry:
    return Entry.create(key or f"k{version}", version, version)


def shipment(version: int, delay: float = 0.0) -> Shipment:
    return Shipment(entry(version), delay, 0.0, delay)


# -- the watermark the leader vouches for -----------------------------------------------


def test_the_outbox_knows_its_lowest_version_delayed_or_ready():
    outbox = Outbox()
    assert outbox.min_version() is None
    outbox.add(shipment(5, delay=1.0))
    outbox.add(shipment(3, delay=2.0))
    outbox.add(shipment(7))
    assert outbox.min_version() == 3
    assert [s.entry.version for s in outbox.take_ready(1.0)] == [5, 7]
    assert outbox.min_version() == 3
    taken = outbox.take_ready(2.0)
    assert outbox.min_version() is None
    outbox.retry(taken, 3.0)
    assert outbox.min_version() == 3


def test_through_stops_below_anything_still_held_back_for_the_follower():
    progress = FollowerProgress(lambda: [])
    progress.handle_pulled("a", in_sync=True, now=0.0)
    for version, delay in ((1, 0.0), (2, 0.5), (3, 0.0)):
        progress.queue(shipment(version, delay))
    batch = progress.next_batch(0.0, 1)
    assert batch is not None and [s.entry.version for s in batch] == [1, 3]
    assert progress.sending(batch, 0.0, last_version=3) == 1, "2 is still in its delay"
    progress.handle_success(batch, Confirmation("a", 3), 0.1)
    later = progress.next_batch(0.5, 1)
    assert later is not None and [s.entry.version for s in later] == [2]
    assert progress.sending(later, 0.5, last_version=3) == 3, "with 2 applied, all of 1..3 are"


def test_a_heartbeat_beside_a_batch_on_the_wire_does_not_vouch_for_it():
    progress = FollowerProgress(lambda: [])
    progress.handle_pulled("a", in_sync=True, now=0.0)
    progress.queue(shipment(1))
    batch = progress.next_batch(0.0, 1)
    assert batch is not None
    assert progress.sending(batch, 0.0, last_version=1) == 1
    beat = progress.next_batch(0.6, 1)
    assert beat == []
    assert progress.sending(beat, 0.6, last_version=1) == 0, "1 may not have landed yet"


def test_a_follower_takes_through_only_when_meant_for_its_own_process():
    follower = FollowerCore()
    follower.handle_replicate(1, "leader", [entry(1)], through=1, node_id="another process")
    assert follower.applied_through == 0
    follower.handle_replicate(1, "leader", [entry(2)], through=2, node_id=follower.node_id)
    assert follower.applied_through == 2
    follower.handle_replicate(1, "leader", [], through=1, node_id=follower.node_id)
    assert follower.applied_through == 2, "it never moves back"


# -- conditional writes ------------------------------------------------------------------


def test_a_conditional_write_checks_and_assigns_in_one_step():
    leader = LeaderCore(VersionedStore(), startup_quorum=0)
    leader.begin_term(1)
    first = leader.put("k", 1, if_version=0)
    assert first.version == 1
    with pytest.raises(VersionMismatch) as mismatch:
        leader.put("k", 2, if_version=0)
    assert (mismatch.value.current, mismatch.value.expected) == (1, 0)
    assert leader.store.last_version == 1, "a refused write assigns no version"
    assert leader.put("k", 2, if_version=1).version == 2
    with pytest.raises(VersionMismatch):
        leader.delete("k", if_version=1)
    assert leader.delete("k", if_version=2) is not None
    with pytest.raises(VersionMismatch, match="not to exist"):
        leader.put("k", 3, if_version=None)  # If-Match: * on a deleted key
    assert leader.put("k", 3, if_version=0).version == 4, "deleted counts as absent"


# -- the change feed ---------------------------------------------------------------------


def test_the_feed_releases_in_version_order_up_to_the_watermark():
    feed = ChangeFeed()
    seen: list[int] = []
    feed.subscribe(lambda e: seen.append(e.version))
    feed.received([entry(3), entry(1)], through=1)
    assert seen == [1], "3 waits until everything below it is applied"
    feed.received([entry(2)], through=3)
    assert seen == [1, 2, 3]
    assert [e.version for e in feed.since(1) or []] == [2, 3]
    feed.received([entry(3), entry(2)], through=3)
    assert seen == [1, 2, 3], "a redelivery is not a new event"


def test_a_write_superseded_before_it_arrived_still_takes_its_place_in_the_feed():
    follower = FollowerCore()
    feed = ChangeFeed()
    newer, older = entry(2, "k"), entry(1, "k")
    for batch, through in (([newer], 0), ([older], 2)):
        outcome = follower.handle_replicate(1, "l", batch, through, follower.node_id)
        feed.received(batch, follower.applied_through)
        assert outcome is not None
    assert follower.store.get("k") == newer, "the store keeps the newest"
    assert [e.version for e in feed.since(0) or []] == [1, 2], "the feed keeps the history"


def test_a_small_ring_says_when_it_was_compacted_past():
    feed = ChangeFeed(capacity=2)
    feed.received([entry(v) for v in (1, 2, 3, 4)], through=4)
    assert feed.compacted_through == 2
    assert feed.since(0) is None and feed.since(1) is None
    assert [e.version for e in feed.since(2) or []] == [3, 4]


def test_a_feed_after_a_log_replay_does_not_pretend_to_hold_the_replayed_entries():
    feed = ChangeFeed()
    feed.start_at(compacted_through=10, released_through=0)
    assert feed.since(5) is None
    assert feed.since(10) == []


def test_a_slow_subscriber_is_cut_off_not_buffered_without_bound():
    subscription = Subscription(Filter(None, "a"), limit=2)
    for version, key in ((1, "a1"), (2, "b"), (3, "a2"), (4, "a3")):
        subscription(entry(version, key))
    assert subscription.queue.qsize() == 2 and subscription.overflowed


# -- waiting for a version ---------------------------------------------------------------


async def test_a_reader_waits_for_an_event_not_a_poll():
    gate = VersionGate()
    applied = {"through": 0}
    waiting = asyncio.create_task(gate.wait_for(lambda: applied["through"] >= 2, 5.0))
    await asyncio.sleep(0)
    assert gate.waiting == 1
    applied["through"] = 1
    gate.notify()
    await asyncio.sleep(0)
    assert not waiting.done()
    applied["through"] = 2
    gate.notify()
    assert await waiting is True
    assert gate.waiting == 0
    assert await gate.wait_for(lambda: False, 0.01) is False


def test_a_bulk_batch_nobody_watches_keeps_the_same_newest_entries_as_one_by_one():
    """A starting leader adopts a million entries at once: the feed sorts only the newest
    `capacity` of them, and must end up as if it had taken them in order."""
    entries = [Entry.create(f"k{v % 977}", v, v) for v in range(1, 60_002)]
    random.Random(3).shuffle(entries)
    held_back = Entry.create("late", 0, 70_000)  # above the watermark: still held
    bulk, reference = ChangeFeed(capacity=100), ChangeFeed(capacity=100)
    reference.subscribe(lambda _: None)  # a watcher: the one-by-one path
    for feed in (bulk, reference):
        feed.received([*entries, entries[0], held_back], through=60_001)
    assert bulk.compacted_through == reference.compacted_through == 59_901
    assert [e.version for e in bulk.since(59_901) or []] == list(range(59_902, 60_002))
    assert bulk.since(59_901) == reference.since(59_901)
    assert bulk.since(100) is None  # compacted past it, as the reference says too
    bulk.release(70_000)
    assert (bulk.since(60_001) or [])[-1].version == 70_000
