"""FollowerProgress as a state machine: heartbeats, pulls, failures, restarts, fencing, the cap."""

from kv.core.outbox import Shipment
from kv.core.progress import Confirmation, FollowerProgress, FollowerState
from kv.core.records import Entry
from kv.core.store import VersionedStore


def shipment(version: int, at: float = 0.0, delay: float = 0.0) -> Shipment:
    return Shipment(Entry.create(f"k{version}", version, version), delay, at, at + delay)


def heartbeat(progress: FollowerProgress, node: str, now: float, last_version: int = 0) -> None:
    beat = progress.next_batch(now, 1)
    assert beat == []
    progress.sending(beat, now)
    progress.handle_success(beat, Confirmation(node, last_version), now)


def met(progress: FollowerProgress, node: str = "node-a", now: float = 0.0) -> None:
    """First contact: the pull of its entries (found in sync), then a heartbeat."""
    assert progress.wants_pull(now)
    assert progress.next_batch(now, 1) == [], "a heartbeat, but no data, before the pull"
    progress.handle_pulled(node, in_sync=True, now=now)
    heartbeat(progress, node, now)


def one_write_sent(progress: FollowerProgress, now: float) -> list[Shipment]:
    """Meet the follower, queue one write and put its batch on the wire."""
    met(progress)
    progress.queue(shipment(1, at=now))
    batch = progress.next_batch(now, 1)
    assert batch is not None and [s.entry.version for s in batch] == [1]
    progress.sending(batch, now)
    return batch


def test_an_idle_follower_gets_a_heartbeat_every_half_second():
    progress = FollowerProgress(lambda: [])
    met(progress)
    assert progress.next_batch(0.2, 1) is None
    assert progress.next_wake(0.2, 1) == 0.5
    assert progress.next_batch(0.5, 1) == []
    assert (progress.heartbeats, progress.batches) == (1, 0), "heartbeats are not batches"
    assert progress.resyncs == 0, "first contact is not a resync"


def test_a_heartbeat_goes_out_beside_a_batch_that_gets_no_answer():
    """Failure detection does not wait for a stuck data batch's long timeout."""
    progress = FollowerProgress(lambda: [])
    batch = one_write_sent(progress, now=1.0)
    assert progress.next_batch(1.2, 1) is None, "the batch is still within its heartbeat interval"
    assert progress.next_wake(1.2, 1) == 1.5
    beat = progress.next_batch(1.5, 1)
    assert beat == [], "a heartbeat, though a batch is on the wire"
    progress.sending(beat, 1.5)
    assert progress.next_batch(1.9, 1) is None, "one heartbeat at a time"
    progress.handle_failure(beat, 2.0, "no answer within 500 ms")
    assert progress.state(2.0) == FollowerState.DOWN
    assert progress.last_error == "no answer within 500 ms"
    assert (progress.batches_in_flight, progress.entries_in_flight) == (1, 1), "the batch waits on"
    progress.handle_success(batch, Confirmation("node-a", 1), 2.5)
    assert progress.state(2.5) == FollowerState.UP, "the batch's answer brings it back"


def test_a_heartbeats_round_trip_is_recorded():
    progress = FollowerProgress(lambda: [])
    met(progress)
    beat = progress.next_batch(0.5, 1)
    assert beat == []
    progress.sending(beat, 0.5)
    progress.handle_success(beat, Confirmation("node-a", 0), 0.503)
    assert progress.heartbeat_rtt is not None and abs(progress.heartbeat_rtt - 0.003) < 1e-9


def test_first_contact_pulls_before_sending_and_resyncs_only_if_out_of_sync():
    store = VersionedStore()
    store.put("a", 1)
    store.put("b", 2)
    store.delete("a")
    progress = FollowerProgress(store.entries)
    progress.queue(shipment(3))
    assert progress.state(0.0) == FollowerState.RESYNCING
    assert progress.next_batch(0.0, 1) == [], "no data before its entries are merged"
    assert progress.wants_pull(0.0)
    progress.handle_pulled("a", in_sync=False, now=0.0)
    assert progress.resyncs == 1 and progress.pulls == 1
    snapshot = progress.next_batch(0.0, 1)
    assert snapshot is not None
    keys = {(s.entry.key, s.entry.deleted) for s in snapshot}
    assert keys == {("b", False), ("a", True), ("k3", False)}
    progress.sending(snapshot, 0.0)
    progress.handle_success(snapshot, Confirmation("a", 3), 0.0)
    assert progress.state(0.0) == FollowerState.UP
    assert progress.follower_last_version == 3


def test_a_follower_in_sync_at_first_contact_gets_no_snapshot():
    progress = FollowerProgress(lambda: [Entry.create("k", 1, 1)])
    met(progress)
    assert progress.resyncs == 0 and progress.snapshot_outstanding == 0
    assert progress.state(0.0) == FollowerState.UP


def test_a_follower_read_at_the_leaders_start_up_needs_no_pull():
    progress = FollowerProgress(lambda: [])
    progress.adopt("a", in_sync=True, now=0.0)
    heartbeat(progress, "a", 0.0)
    assert not progress.needs_pull and progress.pulls == 0


def test_a_restart_is_noticed_by_its_new_node_id_and_pulled_again():
    store = VersionedStore()
    progress = FollowerProgress(store.entries)
    met(progress, "before")
    store.put("k", 1)
    progress.queue(shipment(1))
    batch = progress.next_batch(1.0, 1)
    assert batch is not None
    progress.sending(batch, 1.0)
    progress.handle_success(batch, Confirmation("after", 1), 1.0)
    assert progress.needs_pull and progress.state(1.0) == FollowerState.RESYNCING
    progress.handle_pulled("after", in_sync=False, now=1.0)
    resync = progress.next_batch(1.0, 1)
    assert resync is not None and [s.entry.key for s in resync] == ["k"]


def test_failures_mark_the_follower_down_and_retry_after_a_backoff():
    progress = FollowerProgress(lambda: [])
    batch = one_write_sent(progress, 1.0)
    backoff = progress.handle_failure(batch, 1.0, "ConnectError")
    assert progress.state(1.0) == FollowerState.DOWN and not progress.can_confirm
    assert progress.next_batch(1.0 + backoff / 2, 1) is None
    assert progress.next_wake(1.0, 1) == 1.0 + backoff
    again = progress.next_batch(1.0 + backoff, 1)
    assert again is not None and again[0].attempts == 1
    progress.sending(again, 1.0 + backoff)
    assert progress.handle_success(again, Confirmation("node-a", 1), 2.0) is True
    assert progress.can_confirm and progress.state(2.0) == FollowerState.UP


def test_a_fenced_batch_goes_back_and_the_follower_is_pulled():
    progress = FollowerProgress(lambda: [])
    batch = one_write_sent(progress, 1.0)
    progress.handle_fenced(batch, 1.0, "HTTP 409: older term")
    assert progress.needs_pull and progress.consecutive_failures == 0
    assert progress.next_batch(1.0, 1) is None
    progress.handle_pulled("node-a", in_sync=True, now=1.0)
    again = progress.next_batch(1.0, 1)
    assert again is not None and [s.entry.version for s in again] == [1]


def test_a_failed_pull_backs_off_and_is_retried():
    progress = FollowerProgress(lambda: [])
    backoff = progress.handle_pull_failure(0.0, "ReadTimeout")
    assert progress.state(0.0) == FollowerState.DOWN
    assert not progress.wants_pull(backoff / 2)
    assert progress.wants_pull(backoff)


def test_past_the_backlog_cap_the_queue_is_replaced_by_a_snapshot():
    store = VersionedStore()
    for i in range(3):
        store.put(f"key{i % 2}", i)  # two keys, three writes
    progress = FollowerProgress(store.entries, max_backlog=3)
    for version in (1, 2, 3):
        assert progress.queue(shipment(version)) == []
    assert progress.backlog(0.0) == 3
    undeliverable = progress.queue(shipment(4))
    assert [s.entry.version for s in undeliverable] == [1, 2, 3, 4]
    assert progress.backlog(0.0) == 0, "the dropped queue no longer counts"
    assert progress.snapshot_outstanding == 2 and len(progress.outbox) == 2
    assert progress.state(0.0) == FollowerState.RESYNCING
    # New writes queue behind the snapshot as usual.
    assert progress.queue(shipment(5)) == []
    assert progress.backlog(0.0) == 1


def test_entries_inside_their_simulated_delay_do_not_count_against_the_cap():
    progress = FollowerProgress(lambda: [], max_backlog=3)
    met(progress)
    for version in range(1, 101):
        assert progress.queue(shipment(version, at=0.0, delay=1.0)) == []
    assert progress.backlog(0.5) == 0 and progress.pending == 100
    assert progress.resyncs == 0


def test_the_backlog_stays_bounded_for_a_follower_that_never_answers():
    store = VersionedStore()
    progress = FollowerProgress(store.entries, max_backlog=100)
    for version in range(1, 10_001):
        store.put(f"key{version % 50}", version)
        progress.queue(shipment(version))
        assert len(progress.outbox) <= 100 + 50
    assert progress.resyncs >= 99
