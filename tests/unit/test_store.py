"""The apply rules: versions, apply-if-newer and tombstones."""

import json
import random

from kv.core.records import Entry
from kv.core.store import VersionedStore


def test_leader_versions_strictly_increase_across_keys_and_deletes():
    store = VersionedStore()
    versions = [store.put("a", 1).version, store.put("b", 2).version, store.put("a", 3).version]
    deletion = store.delete("a")
    assert deletion is not None
    versions.append(deletion.version)
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert store.last_version == versions[-1]


def test_put_applies_in_the_same_step():
    store = VersionedStore()
    entry = store.put("k", {"nested": [1, 2]})
    held = store.get("k")
    assert held is not None
    assert (held.value, held.version) == ({"nested": [1, 2]}, entry.version)


def test_delete_of_absent_or_deleted_key_assigns_nothing():
    store = VersionedStore()
    assert store.delete("missing") is None
    store.put("k", 1)
    assert store.delete("k") is not None
    last = store.last_version
    assert store.delete("k") is None
    assert store.last_version == last


def test_replica_applies_only_newer_versions():
    replica = VersionedStore()
    assert replica.maybe_apply(Entry("k", "new", 5))
    assert not replica.maybe_apply(Entry("k", "old", 3))
    assert not replica.maybe_apply(Entry("k", "repeat", 5))
    held = replica.get("k")
    assert held is not None and (held.value, held.version) == ("new", 5)


def test_tombstone_stops_a_late_write_from_resurrecting_the_key():
    replica = VersionedStore()
    replica.maybe_apply(Entry("k", "v1", 1))
    replica.maybe_apply(Entry("k", None, 3, deleted=True))
    assert not replica.maybe_apply(Entry("k", "v2", 2))  # overtaken by the deletion
    assert replica.get("k") is None
    assert replica.held("k").version == 3
    assert replica.keys() == []


def test_tombstone_arriving_first_for_an_unknown_key_is_kept():
    replica = VersionedStore()
    assert replica.maybe_apply(Entry("k", None, 2, deleted=True))
    assert not replica.maybe_apply(Entry("k", "v1", 1))
    assert replica.get("k") is None


def test_any_delivery_order_converges_to_the_leader():
    leader = VersionedStore()
    log = [leader.put("a", 1), leader.put("b", 2), leader.put("a", 3)]
    deletion = leader.delete("b")
    assert deletion is not None
    log += [deletion, leader.put("c", 4), leader.put("b", 5)]
    for order in (log, list(reversed(log)), log[::2] + log[1::2]):
        replica = VersionedStore()
        replica.apply_batch(order)
        assert [(e.key, e.value, e.version) for e in replica.live_items()] == [
            (e.key, e.value, e.version) for e in leader.live_items()
        ]
        assert replica.last_version == leader.last_version


def test_apply_batch_counts_stale_entries_as_delivered():
    replica = VersionedStore()
    first = replica.apply_batch([Entry("k", 1, 1), Entry("k", 2, 2)])
    again = replica.apply_batch([Entry("k", 1, 1), Entry("k", 2, 2)])
    assert (len(first.applied), first.stale) == (2, 0)
    assert (again.applied, again.stale) == ([], 2)


def test_advance_to_keeps_new_versions_above_any_seen():
    store = VersionedStore()
    store.put("a", 1)
    store.advance_to(41)
    store.advance_to(7)
    assert store.put("b", 2).version == 42


def test_entry_encoding_is_valid_json_and_round_trips():
    entry = Entry.create('we"ird/ key?#%', {"ü": [1, None, True]}, 7)
    assert json.loads(entry.encoded) == {
        "key": 'we"ird/ key?#%',
        "value": {"ü": [1, None, True]},
        "version": 7,
        "deleted": False,
    }
    tombstone = Entry.create("k", None, 8, deleted=True)
    assert json.loads(tombstone.encoded)["deleted"] is True


def test_entries_snapshot_includes_tombstones_in_version_order():
    store = VersionedStore()
    store.put("a", 1)
    store.put("b", 2)
    store.delete("a")
    assert [(e.key, e.deleted) for e in store.entries()] == [("b", False), ("a", True)]


def test_the_fingerprint_kept_up_to_date_equals_one_computed_afresh():
    from kv.core.store import fingerprint

    leader, replica = VersionedStore(), VersionedStore()
    leader.begin_term(1)
    for i in range(200):
        leader.put(f"k{i % 13}", i)
        if i % 7 == 0:
            leader.delete(f"k{i % 13}")
    for entry in reversed(leader.entries()):  # out of order: stale ones change nothing
        replica.maybe_apply(entry)
    assert leader.fingerprint() == fingerprint(leader.entries()) == replica.fingerprint()


def test_a_value_is_cut_out_of_its_entry_whatever_the_key_holds():
    """The store keeps only each value's JSON, cut out of the entry's: a key that spells
    out the field names must not fool the cut."""
    for key in ['a,"value":1', 'x","version":3,"value":"', 'ü\\"', ""]:
        for value in ["s", {"version": ',"version":9'}, 2**70, [None], -0.5]:
            entry = Entry.create(key, value, 42)
            assert json.loads(entry.value_json) == value
            store = VersionedStore()
            store.maybe_apply(entry)
            held = store.get(key)
            assert held is not None and held == entry and held.value == value
            assert held.encoded == entry.encoded


def test_entries_rebuilt_from_the_packed_store_keep_their_request_tags():
    from kv.core.requests import RequestTag

    store = VersionedStore()
    tagged = store.put("k", 1, request=RequestTag("r1", 5))
    held = store.held("k")
    assert held is not None and held.request == RequestTag("r1", 5) and held.wire == tagged.wire
    store.put("k", 2)  # an untagged write replaces it: its tag goes too
    assert store.held("k").request is None  # type: ignore[union-attr]


def test_pages_are_in_version_order_after_entries_arrive_out_of_order():
    """A replica applies batches in any order; its pages must still list every entry once,
    in version order, as a leader reading it pages through them."""
    rng = random.Random(7)
    leader = VersionedStore()
    for i in range(500):
        if i % 9 == 0 and leader.get(f"k{i % 37}") is not None:
            leader.delete(f"k{i % 37}")
        else:
            leader.put(f"k{i % 37}", i)
    shuffled = leader.entries()
    rng.shuffle(shuffled)
    replica = VersionedStore()
    paged: list[Entry] = []
    for entry in shuffled:
        replica.maybe_apply(entry)
        replica.page(0, 5)  # the order is made, and must be made again after changes
    after = 0
    while page := replica.page(after, 4):
        paged += page
        after = page[-1].version
    assert [(e.key, e.version, e.deleted) for e in paged] == [
        (e.key, e.version, e.deleted) for e in leader.entries()
    ]
    assert replica.page(-3, 1)[0].version == leader.entries()[0].version


def test_a_snapshot_reads_each_entry_as_it_is_when_read():
    store = VersionedStore()
    for i in range(5):
        store.put(f"k{i}", i)
    snapshot = store.snapshot()
    top = snapshot.top
    store.put("k0", "new")
    assert len(snapshot) == 5 and top == store.last_version - 1
    assert [(e.key, e.value) for e in snapshot[:2]] == [("k0", "new"), ("k1", 1)]
    assert snapshot[0].version > top and snapshot[4].value == 4


def test_an_entry_in_another_layout_still_gives_its_value():
    """Entries from a page or log keep the bytes they came in: JSON with its fields in
    another order (hand-made) must not be cut apart as if it were in ours."""
    wire = b'{"version":3,"deleted":false,"value":{"a":[1,2]},"key":"k"}'
    entry = Entry.from_wire(wire)
    assert json.loads(entry.value_json) == {"a": [1, 2]}
    store = VersionedStore()
    store.maybe_apply(entry)
    assert store.get("k").value == {"a": [1, 2]}  # type: ignore[union-attr]
