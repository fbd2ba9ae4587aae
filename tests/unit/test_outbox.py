"""The replication core as a state machine: time is passed in, nothing touches a socket."""

import json
import random

import pytest

from kv.core.outbox import DelayModel, Outbox, Shipment, encode_batch, quorum_reached, retry_backoff
from kv.core.records import Entry
from kv.core.store import VersionedStore


def shipment(version: int, ready_at: float, key: str = "k", value: object = 0) -> Shipment:
    return Shipment(Entry.create(key, value, version), 0.0, 0.0, ready_at)


def test_nothing_ships_before_its_delay_has_passed():
    outbox = Outbox()
    outbox.add(shipment(1, ready_at=0.5))
    assert outbox.take_ready(now=0.4) == []
    assert outbox.next_ready_at() == 0.5
    assert [s.entry.version for s in outbox.take_ready(now=0.5)] == [1]
    assert len(outbox) == 0


def test_everything_ready_ships_in_one_batch_in_version_order():
    outbox = Outbox()
    for version, ready_at in [(3, 0.1), (1, 0.3), (2, 0.2), (4, 0.9)]:
        outbox.add(shipment(version, ready_at))
    batch = outbox.take_ready(now=0.5)
    assert [s.entry.version for s in batch] == [1, 2, 3]
    assert len(outbox) == 1


def test_entries_become_ready_out_of_order_and_ship_in_later_batches():
    outbox = Outbox()
    outbox.add(shipment(1, ready_at=0.8))  # written first, delayed longest
    outbox.add(shipment(2, ready_at=0.1))
    assert [s.entry.version for s in outbox.take_ready(now=0.2)] == [2]
    assert [s.entry.version for s in outbox.take_ready(now=0.8)] == [1]


def test_batch_entry_cap():
    outbox = Outbox(max_batch_entries=3)
    for version in range(1, 8):
        outbox.add(shipment(version, 0.0))
    sizes = [len(outbox.take_ready(1.0)) for _ in range(3)]
    assert sizes == [3, 3, 1]


def test_batch_byte_cap_still_ships_an_oversized_entry_alone():
    outbox = Outbox(max_batch_bytes=100)
    outbox.add(shipment(1, 0.0, value="x" * 500))
    outbox.add(shipment(2, 0.0, value="y"))
    first = outbox.take_ready(1.0)
    assert [s.entry.version for s in first] == [1]
    assert [s.entry.version for s in outbox.take_ready(1.0)] == [2]


def test_a_failed_batch_goes_back_as_ready_and_counts_attempts():
    outbox = Outbox()
    outbox.add(shipment(1, 0.0))
    batch = outbox.take_ready(0.0)
    outbox.retry(batch, at=0.25)
    # The follower failed to take it: it is part of the backlog at once (the backoff is
    # the follower's, enforced by its progress, not the entry's).
    assert outbox.ready_count(0.1) == 1
    again = outbox.take_ready(0.25)
    assert [s.attempts for s in again] == [1]


def test_entries_inside_their_simulated_delay_are_not_backlog():
    outbox = Outbox()
    outbox.add(shipment(1, 0.5))
    outbox.add(shipment(2, 0.1))
    assert len(outbox) == 2 and outbox.ready_count(0.0) == 0
    assert outbox.ready_count(0.2) == 1
    assert [s.entry.version for s in outbox.take_ready(1.0)] == [1, 2]


def test_retry_backoff_grows_and_is_capped():
    assert retry_backoff(0) == 0
    delays = [retry_backoff(n) for n in range(1, 10)]
    assert delays[:3] == [0.05, 0.1, 0.2]
    assert delays == sorted(delays)
    assert max(delays) == 1.0


def test_encode_batch_is_the_replicate_body():
    batch = [shipment(1, 0.0, "a", [1]), shipment(2, 0.0, "b", {"x": None})]
    body = json.loads(encode_batch(batch, 3, "leader-a"))
    assert (body["term"], body["leader_id"]) == (3, "leader-a")
    assert [e["key"] for e in body["entries"]] == ["a", "b"]
    assert body["entries"][1]["value"] == {"x": None}


def test_delay_model_draws_within_bounds_reproducibly():
    a = DelayModel(10, 20, random.Random(7))
    b = DelayModel(10, 20, random.Random(7))
    draws = [a.draw_ms() for _ in range(1000)]
    assert draws == [b.draw_ms() for _ in range(1000)]
    assert all(10 <= d <= 20 for d in draws)
    assert DelayModel(5, 5).draw_ms() == 5


def test_expected_kth_fastest_of_uniform_draws():
    model = DelayModel(0, 1000)
    expected = [model.expected_kth_fastest_ms(k, 5) for k in range(1, 6)]
    assert expected == pytest.approx([166.67, 333.33, 500.0, 666.67, 833.33], abs=0.01)
    rng = random.Random(1)
    samples = [sorted(rng.uniform(0, 1000) for _ in range(5))[2] for _ in range(20000)]
    assert sum(samples) / len(samples) == pytest.approx(expected[2], abs=10)


def test_quorum_counting():
    assert quorum_reached(acks=0, required=0)
    assert not quorum_reached(acks=2, required=3)
    assert quorum_reached(acks=3, required=3)


def test_a_snapshot_is_made_into_shipments_a_batch_at_a_time():
    """A million-entry snapshot must not stall the leader: the outbox holds the entries and
    makes shipments only as batches leave, while counting every entry as held."""
    outbox = Outbox(max_batch_entries=4, max_snapshot_batch=100)
    entries = [Entry.create(f"k{v}", v, v) for v in range(1, 1001)]
    outbox.add_snapshot(entries, now=0.0)
    assert len(outbox) == outbox.ready_count(0.0) == 1000 and outbox.min_version() == 1
    assert outbox.next_ready_at() == float("-inf")
    outbox.add(Shipment(Entry.create("w", 0, 2000), 0.0, 0.0, 0.0))  # a write meanwhile
    first = outbox.take_ready(0.0)
    assert [s.entry.version for s in first] == list(range(1, 101))  # a snapshot-sized batch
    assert all(s.resync for s in first) and outbox.snapshot_left == 900
    assert outbox.min_version() == 101 and len(outbox) == 901
    taken = [s.entry.version for _ in range(9) for s in outbox.take_ready(0.0)]
    assert taken == list(range(101, 1001))
    assert [s.entry.version for s in outbox.take_ready(0.0)] == [2000]  # writes: 4 a batch
    assert len(outbox) == 0 and outbox.min_version() is None


def test_draining_drops_the_snapshot_not_yet_shipped_unmade():
    """A backlog dropped during a snapshot is replaced by a new snapshot, so the entries
    the old one had yet to ship are counted (snapshot_left), not made into shipments."""
    outbox = Outbox(max_snapshot_batch=10)
    outbox.add_snapshot([Entry.create(f"k{v}", v, v) for v in range(1, 51)], now=0.0)
    outbox.take_ready(0.0)
    outbox.add(Shipment(Entry.create("w", 0, 60), 0.0, 0.0, 5.0))
    assert outbox.snapshot_left == 40
    assert [s.entry.version for s in outbox.drain()] == [60]
    assert len(outbox) == 0 and outbox.min_version() is None and outbox.snapshot_left == 0


def test_a_new_snapshot_replaces_one_still_going():
    outbox = Outbox(max_snapshot_batch=10)
    outbox.add_snapshot([Entry.create(f"k{v}", v, v) for v in range(1, 51)], now=0.0)
    outbox.take_ready(0.0)
    assert outbox.add_snapshot([Entry.create(f"k{v}", v, v) for v in range(1, 61)], 1.0) == 40
    assert outbox.snapshot_left == 60


def test_a_lazy_snapshot_ships_what_the_store_holds_when_it_ships():
    """A store's snapshot is read a batch at a time, in the order the snapshot was taken: a
    key written since ships its newest entry, and min_version() stays at most the version
    of any entry the follower has yet to get, though the changed key's old version is gone."""
    store = VersionedStore()
    for i in range(1, 7):
        store.put(f"k{i}", i)  # versions 1..6
    outbox = Outbox(max_snapshot_batch=2)
    outbox.add_snapshot(store.snapshot(), now=0.0)
    assert outbox.min_version() == 1
    store.put("k1", "new")  # version 7, written after the snapshot was taken
    store.put("k4", "new")  # version 8
    first = outbox.take_ready(0.0)
    assert [(s.entry.key, s.entry.version, s.entry.value) for s in first] == [
        ("k1", 7, "new"),
        ("k2", 2, 2),
    ]
    assert outbox.min_version() == 3  # k3 (version 3) is next
    second = outbox.take_ready(0.0)
    assert [(s.entry.key, s.entry.version) for s in second] == [("k3", 3), ("k4", 8)]
    assert outbox.min_version() == 4  # k3 seen; k4 changed, so its old version tells nothing
    rest = [(s.entry.key, s.entry.version) for s in outbox.take_ready(0.0)]
    assert rest == [("k5", 5), ("k6", 6)] and outbox.min_version() is None


def test_a_snapshot_batch_stops_at_the_byte_limit_and_its_last_takes_the_writes_after_it():
    """Large values: a snapshot batch holds what fits in max_batch_bytes (at least one
    entry), and the writes queued behind the snapshot fill its last batch."""
    outbox = Outbox(max_batch_bytes=1_000, max_snapshot_batch=100)
    entries = [Entry.create(f"k{v}", "x" * 300, v) for v in range(1, 8)]
    assert all(300 < len(e.wire) < 500 for e in entries)  # two fit in a batch, not three
    outbox.add_snapshot(entries, now=0.0)
    outbox.add(Shipment(Entry.create("w", 0, 10), 0.0, 0.0, 0.0))
    batches = []
    while batch := outbox.take_ready(0.0):
        batches.append([s.entry.version for s in batch])
    assert batches == [[1, 2], [3, 4], [5, 6], [7, 10]]
    assert len(outbox) == 0 and outbox.min_version() is None
