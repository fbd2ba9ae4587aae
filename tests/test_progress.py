"""FollowerProgress as a state machine: heartbeats, failures, restarts and the backlog cap."""

from progress import Confirmation, FollowerProgress
from replication import FollowerState, Shipment
from store import Entry, VersionedStore


def shipment(version: int, at: float = 0.0) -> Shipment:
    return Shipment(Entry.create(f"k{version}", version, version), 0.0, at, at)


def met(progress: FollowerProgress, node: str = "node-a", now: float = 0.0) -> None:
    """Complete the first contact (a heartbeat) and the resync it triggers."""
    heartbeat = progress.next_batch(now, 1)
    assert heartbeat == []
    progress.sending(heartbeat, now)
    progress.handle_success(heartbeat, Confirmation(node, 0), now)
    snapshot = progress.next_batch(now, 1)
    if snapshot:
        progress.sending(snapshot, now)
        progress.handle_success(snapshot, Confirmation(node, 0), now)


def test_an_idle_follower_gets_a_heartbeat_every_half_second():
    progress = FollowerProgress(lambda: [])
    assert progress.next_batch(0.0, 1) == []
    progress.sending([], 0.0)
    assert progress.next_batch(0.1, 1) is None  # one in flight
    progress.handle_success([], Confirmation("a", 0), 0.1)
    assert progress.next_batch(0.2, 1) is None
    assert progress.next_wake(0.2, 1) == 0.5
    assert progress.next_batch(0.5, 1) == []


def test_first_contact_resyncs_with_the_whole_store_tombstones_included():
    store = VersionedStore()
    store.put("a", 1)
    store.put("b", 2)
    store.delete("a")
    progress = FollowerProgress(store.entries)
    heartbeat = progress.next_batch(0.0, 1)
    assert heartbeat is not None
    progress.sending(heartbeat, 0.0)
    progress.handle_success(heartbeat, Confirmation("a", 0), 0.0)
    assert progress.state(0.0) == FollowerState.RESYNCING
    snapshot = progress.next_batch(0.0, 1)
    assert snapshot is not None
    assert [(s.entry.key, s.entry.deleted) for s in snapshot] == [("b", False), ("a", True)]
    progress.sending(snapshot, 0.0)
    progress.handle_success(snapshot, Confirmation("a", 3), 0.0)
    assert progress.state(0.0) == FollowerState.UP
    assert progress.follower_last_version == 3


def test_a_restart_is_noticed_by_its_new_node_id_and_resynced():
    store = VersionedStore()
    progress = FollowerProgress(store.entries)
    met(progress, "before")
    store.put("k", 1)
    progress.queue(shipment(1))
    batch = progress.next_batch(1.0, 1)
    assert batch is not None
    progress.sending(batch, 1.0)
    progress.handle_success(batch, Confirmation("after", 1), 1.0)
    assert progress.resyncs == 2  # the first contact, then the restart
    assert progress.state(1.0) == FollowerState.RESYNCING
    resync = progress.next_batch(1.0, 1)
    assert resync is not None and [s.entry.key for s in resync] == ["k"]


def test_failures_mark_the_follower_down_and_retry_after_a_backoff():
    progress = FollowerProgress(lambda: [])
    met(progress)
    progress.queue(shipment(1, at=1.0))
    batch = progress.next_batch(1.0, 1)
    assert batch is not None
    progress.sending(batch, 1.0)
    backoff = progress.handle_failure(batch, 1.0, "ConnectError")
    assert progress.state(1.0) == FollowerState.DOWN and not progress.can_confirm
    assert progress.next_batch(1.0 + backoff / 2, 1) is None
    assert progress.next_wake(1.0, 1) == 1.0 + backoff
    again = progress.next_batch(1.0 + backoff, 1)
    assert again is not None and again[0].attempts == 1
    progress.sending(again, 1.0 + backoff)
    assert progress.handle_success(again, Confirmation("node-a", 1), 2.0) is True
    assert progress.can_confirm and progress.state(2.0) == FollowerState.UP


def test_past_the_backlog_cap_the_queue_is_replaced_by_a_snapshot():
    store = VersionedStore()
    for i in range(3):
        store.put(f"key{i % 2}", i)  # two keys, three writes
    progress = FollowerProgress(store.entries, max_backlog=3)
    for version in (1, 2, 3):
        assert progress.queue(shipment(version)) == []
    assert progress.backlog == 3
    undeliverable = progress.queue(shipment(4))
    assert [s.entry.version for s in undeliverable] == [1, 2, 3, 4]
    assert progress.backlog == 0, "the dropped queue no longer counts"
    assert progress.snapshot_outstanding == 2 and len(progress.outbox) == 2
    assert progress.state(0.0) == FollowerState.RESYNCING
    # New writes queue behind the snapshot as usual.
    assert progress.queue(shipment(5)) == []
    assert progress.backlog == 1


def test_the_backlog_stays_bounded_for_a_follower_that_never_answers():
    store = VersionedStore()
    progress = FollowerProgress(store.entries, max_backlog=100)
    for version in range(1, 10_001):
        store.put(f"key{version % 50}", version)
        progress.queue(shipment(version))
        assert len(progress.outbox) <= 100 + 50
    assert progress.resyncs >= 99
