"""The on-disk log: round trips, torn records, compaction and the fsync policies."""

import asyncio
import os
from pathlib import Path

import pytest

from kv.core.records import Entry
from kv.core.store import VersionedStore
from kv.settings import FsyncPolicy
from kv.storage.log import (
    SNAPSHOT,
    CorruptLogError,
    DurableLog,
    decode_record,
    encode_record,
    restore,
)


def counting_fsync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def restored(directory: Path) -> VersionedStore:
    store = VersionedStore()
    durable = DurableLog(directory)
    for entry in durable.recover().entries:
        store.maybe_apply(entry)
    return store


def test_record_round_trip_and_damage_detection():
    entry = Entry.create("ключ/?#", {"v": [1, None]}, 7)
    record = encode_record(entry)
    assert decode_record(record) == entry
    assert decode_record(record[:-1]) is None  # no newline: torn
    flipped = record.replace(b"[1,", b"[2,")
    assert decode_record(flipped) is None  # CRC mismatch


async def test_entries_and_tombstones_survive_a_restart(tmp_path: Path):
    durable = DurableLog(tmp_path, FsyncPolicy.ALWAYS)
    durable.recover()
    store = VersionedStore()
    entries = [store.put("a", 1), store.put("b", 2)]
    deletion = store.delete("a")
    assert deletion is not None
    entries.append(deletion)
    durable.append(entries)
    await durable.sync()
    await durable.close()
    again = restored(tmp_path)
    tombstone = again.held("a")
    assert again.get("a") is None and tombstone is not None and tombstone.version == 3
    held = again.get("b")
    assert held is not None and held.value == 2
    assert again.last_version == 3


def test_a_torn_last_record_is_dropped_and_cut_off(tmp_path: Path):
    durable = DurableLog(tmp_path)
    durable.recover()
    durable.append([Entry.create("a", 1, 1), Entry.create("b", 2, 2)])
    log_file = next(tmp_path.glob("log-*.jsonl"))
    with log_file.open("ab") as handle:
        handle.write(encode_record(Entry.create("c", 3, 3))[:-7])  # the crash
    size_before = log_file.stat().st_size
    recovery = DurableLog(tmp_path).recover()
    assert [e.key for e in recovery.entries] == ["a", "b"]
    assert recovery.dropped_tail > 0
    assert log_file.stat().st_size < size_before, "the torn bytes are cut off"
    assert [e.key for e in DurableLog(tmp_path).recover().entries] == ["a", "b"]


def test_damage_before_the_last_record_is_refused(tmp_path: Path):
    durable = DurableLog(tmp_path)
    durable.recover()
    durable.append([Entry.create(k, 1, i) for i, k in enumerate("abc", 1)])
    log_file = next(tmp_path.glob("log-*.jsonl"))
    data = bytearray(log_file.read_bytes())
    data[12] ^= 0xFF  # inside the first record
    log_file.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError, match="damaged record"):
        DurableLog(tmp_path).recover()


async def test_compaction_bounds_what_a_restart_reads(tmp_path: Path):
    durable = DurableLog(tmp_path, FsyncPolicy.NO, compact_floor_bytes=10_000)
    durable.recover()
    store = VersionedStore()
    for i in range(5000):
        durable.append([store.put(f"key{i % 10}", "x" * 20)])
        durable.maybe_compact(store)
    assert durable.compactions >= 5
    await durable.close()
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total < 30_000, "a few snapshots' worth, not 5,000 records"
    again = restored(tmp_path)
    assert [(e.key, e.version) for e in again.live_items()] == [
        (e.key, e.version) for e in store.live_items()
    ]


async def test_a_log_of_new_keys_is_not_compacted_but_one_of_overwrites_is(tmp_path: Path):
    """A follower taking a snapshot appends one record a key: compacting would only copy
    it. Records that supersede earlier ones are what a compaction is for."""
    durable = DurableLog(tmp_path, FsyncPolicy.NO, compact_floor_bytes=10_000)
    durable.recover()
    store = VersionedStore()
    for i in range(3_000):  # about 40 bytes a record: 12 times the floor, all new keys
        durable.append([store.put(f"key{i}", i)])
        assert not durable.maybe_compact(store)
    assert durable.compactions == 0 and durable.log_bytes > 100_000
    for i in range(6_000):  # now overwrite them, twice over
        durable.append([store.put(f"key{i % 3_000}", -i)])
        durable.maybe_compact(store)
    assert durable.compactions >= 1 and durable.snapshot_records == 3_000
    await durable.close()
    assert [(e.key, e.version) for e in restored(tmp_path).live_items()] == [
        (e.key, e.version) for e in store.live_items()
    ]


async def test_a_restart_counts_the_records_its_logs_hold(tmp_path: Path):
    """What a log holds that is superseded is known again after a restart, so a node that
    restarts on a log of overwrites compacts it at its next write."""
    durable = DurableLog(tmp_path, FsyncPolicy.NO, compact_floor_bytes=10_000)
    durable.recover()
    store = VersionedStore()
    for i in range(1_000):
        durable.append([store.put(f"key{i % 10}", i)])  # 35 KB, never asked to compact
    await durable.close()
    again = VersionedStore()
    reopened = restore(tmp_path, FsyncPolicy.NO, again)
    assert reopened.log_records == 1_000 and len(again) == 10
    reopened.compact_floor_bytes = 10_000
    reopened.append([again.put("key0", "last")])
    assert reopened.maybe_compact(again)
    await reopened.close()


async def test_appends_during_compaction_land_in_the_new_log(tmp_path: Path):
    durable = DurableLog(tmp_path, FsyncPolicy.NO, compact_floor_bytes=1)
    durable.recover()
    store = VersionedStore()
    durable.append([store.put("a", 1)])
    durable.compact(store.entries())
    durable.append([store.put("b", 2)])
    await durable.close()
    assert (tmp_path / SNAPSHOT).exists()
    assert {e.key for e in restored(tmp_path).live_items()} == {"a", "b"}


async def test_always_waits_for_one_shared_fsync(tmp_path: Path, monkeypatch):
    calls = counting_fsync(monkeypatch)
    durable = DurableLog(tmp_path, FsyncPolicy.ALWAYS)
    durable.recover()
    calls.clear()
    waits = []
    for i in range(20):
        durable.append([Entry.create(f"k{i}", i, i + 1)])
        waits.append(asyncio.create_task(durable.sync()))
    await asyncio.gather(*waits)
    assert 1 <= len(calls) <= 3, "concurrent writes share fsyncs"
    await durable.close()


async def test_no_policy_never_waits(tmp_path: Path, monkeypatch):
    durable = DurableLog(tmp_path, FsyncPolicy.NO)
    durable.recover()
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("no fsync expected"))
    durable.append([Entry.create("k", 1, 1)])
    await durable.sync()
    monkeypatch.undo()
    await durable.close()


async def test_everysec_syncs_in_the_background(tmp_path: Path, monkeypatch):
    calls = counting_fsync(monkeypatch)
    durable = DurableLog(tmp_path, FsyncPolicy.EVERYSEC)
    durable.recover()
    durable.start()
    calls.clear()
    durable.append([Entry.create("k", 1, 1)])
    await durable.sync()  # does not wait under everysec
    assert calls == []
    for _ in range(40):
        if calls:
            break
        await asyncio.sleep(0.05)
    assert calls, "fsynced within about a second"
    await durable.close()


@pytest.mark.parametrize("tagged", [False, True])
def test_a_replayed_value_is_exact_whatever_parses_the_record(tagged: bool):
    """Records are parsed by orjson where its inexactness cannot reach a value (an
    integer past 64 bits) and by the json module where it could: either way, exact."""
    from kv.core.requests import RequestTag

    huge = {"n": 2**70 + 1, "f": 0.1, "s": "\u00e9\U0001f600"}
    request = RequestTag("retry-1", 12345) if tagged else None
    entry = Entry("k", huge, 7, request=request)
    replayed = decode_record(encode_record(entry))
    assert replayed is not None and replayed.value == huge and replayed.version == 7
    assert replayed.request == request
    assert replayed.same_write(entry)
