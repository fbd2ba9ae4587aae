"""Idempotency keys: the request table, the tag an entry carries, the leader's replay rule,
and what survives compaction and a restart."""

import asyncio
import json
from pathlib import Path

import pytest

from kv.core.records import Entry
from kv.core.requests import RequestTable, RequestTag, invalid_key_reason, request_digest
from kv.core.store import VersionedStore
from kv.leader.node import IdempotencyKeyReused, LeaderCore
from kv.settings import FsyncPolicy
from kv.storage.log import (
    REQUESTS,
    DurableLog,
    decode_record,
    encode_record,
    overwritten_requests,
    restore,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tag(request_id: str, key: str = "k", value_json: str = "1", deleted: bool = False):
    return RequestTag(request_id, request_digest(key, deleted, value_json))


def leader() -> LeaderCore:
    core = LeaderCore(VersionedStore(), 0)
    core.begin_term(1)
    return core


def test_a_request_is_remembered_for_the_window_and_then_forgotten():
    clock = FakeClock()
    table = RequestTable(window_s=60, max_keys=10, clock=clock)
    table.remember(tag("a"), "k", 1, False)
    clock.now += 59
    assert table.lookup("a") is not None
    clock.now += 2
    assert table.lookup("a") is None and len(table) == 0


def test_the_table_never_holds_more_than_max_keys_and_forgets_the_oldest_first():
    table = RequestTable(window_s=3600, max_keys=3, clock=FakeClock())
    for i in range(5):
        table.remember(tag(f"r{i}"), "k", i + 1, False)
    assert len(table) == 3
    assert [table.lookup(f"r{i}") is None for i in range(5)] == [True, True, False, False, False]


def test_a_request_is_remembered_by_its_first_write():
    table = RequestTable(clock=FakeClock())
    table.remember(tag("a"), "k", 5, False)
    table.remember(tag("a"), "k", 9, False)  # a copy (a snapshot, a replay) changes nothing
    seen = table.lookup("a")
    assert seen is not None and seen.version == 5


@pytest.mark.parametrize(
    ("key", "problem"),
    [("", "1 to 255"), ("x" * 256, "1 to 255"), ("ключ", "ASCII"), ("a\nb", "printable")],
)
def test_unusable_idempotency_keys_are_explained(key: str, problem: str):
    reason = invalid_key_reason(key)
    assert reason is not None and problem in reason


def test_the_digest_tells_key_operation_and_value_apart():
    digests = {
        request_digest("k", False, "1"),
        request_digest("k", False, "2"),
        request_digest("k2", False, "1"),
        request_digest("k", True, "null"),
        request_digest("k", False, "null"),
    }
    assert len(digests) == 5
    assert invalid_key_reason("9b2f4c1e-uuid") is None


def test_an_entry_carries_its_tag_through_json_and_the_log():
    entry = Entry.create("k", {"v": 1}, 7, request=tag("req-1", value_json='{"v":1}'))
    assert b'"request":{"id":"req-1"' in entry.wire
    assert b"request" not in entry.encoded  # what clients see: reads, writes, /watch
    back = decode_record(encode_record(entry))
    assert back is not None and back.request == entry.request and back == entry
    plain = Entry.create("k", 1, 8)
    assert b"request" not in plain.encoded and decode_record(encode_record(plain)).request is None


def test_every_replica_learns_the_tag_even_from_an_entry_it_does_not_apply():
    replica = VersionedStore()
    replica.maybe_apply(Entry.create("k", 2, 9))
    late = Entry.create("k", 1, 4, request=tag("late"))
    assert replica.maybe_apply(late) is False  # stale: the newer write stays
    seen = replica.requests.lookup("late")
    assert seen is not None and (seen.key, seen.version) == ("k", 4)


def test_a_repeated_request_replays_its_write_and_writes_nothing():
    core = leader()
    first = core.put("k", 1, "1", request=tag("a"))
    replay = core.replay(tag("a"), "k", 1)
    assert replay is not None and replay.answer == first and replay.confirm == first
    assert core.store.last_version == first.version


def test_a_new_request_is_not_a_replay():
    core = leader()
    core.put("k", 1, "1", request=tag("a"))
    assert core.replay(tag("b"), "k", 1) is None


def test_a_repeat_after_the_key_was_overwritten_answers_with_the_first_write():
    core = leader()
    first = core.put("k", 1, "1", request=tag("a"))
    newer = core.put("k", 2, "2")
    replay = core.replay(tag("a"), "k", 1)
    assert replay is not None
    assert (replay.answer.version, replay.answer.value) == (first.version, 1)
    assert replay.confirm == newer  # followers holding the newer write hold the first too


def test_a_key_reused_for_another_request_is_refused():
    core = leader()
    core.put("k", 1, "1", request=tag("a"))
    with pytest.raises(IdempotencyKeyReused, match="different request"):
        core.replay(tag("a", value_json="2"), "k", 2)
    with pytest.raises(IdempotencyKeyReused):
        core.replay(tag("a", key="other"), "other", 1)


def test_a_deletion_is_replayed_as_the_same_tombstone():
    core = leader()
    core.put("k", 1, "1")
    tombstone = core.delete("k", request=tag("d", deleted=True, value_json="null"))
    assert tombstone is not None
    replay = core.replay(tag("d", deleted=True, value_json="null"), "k", None)
    assert replay is not None and replay.answer == tombstone and replay.answer.deleted


def test_a_promoted_follower_recognises_a_request_it_only_replicated():
    old = leader()
    entry = old.put("k", 1, "1", request=tag("a"))
    replica = VersionedStore()
    replica.maybe_apply(Entry.from_json(json.loads(entry.wire)))
    promoted = LeaderCore(replica, 0)
    promoted.begin_term(2)
    replay = promoted.replay(tag("a"), "k", 1)
    assert replay is not None and replay.answer.version == entry.version


def test_compaction_keeps_overwritten_requests_and_a_restart_recovers_them(tmp_path: Path):
    core = leader()
    durable = DurableLog(tmp_path, FsyncPolicy.NO)
    durable.recover()
    for i in range(3):
        durable.append([core.put("k", i, str(i), request=tag(f"r{i}", value_json=str(i)))])
    assert durable.maybe_compact(core.store) is False  # under the floor
    durable.compact(core.store.entries(), overwritten_requests(core.store))
    asyncio.run(durable.close())
    assert len((tmp_path / REQUESTS).read_bytes().splitlines()) == 2  # r2 is in the snapshot

    store = VersionedStore()
    asyncio.run(restore(tmp_path, FsyncPolicy.NO, store).close())
    restarted = LeaderCore(store, 0)
    restarted.begin_term(2)
    for i in range(3):
        replay = restarted.replay(tag(f"r{i}", value_json=str(i)), "k", i)
        assert replay is not None and replay.answer.version == i + 1


def test_a_damaged_requests_record_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    (tmp_path / REQUESTS).write_bytes(b"00000000 {}\n")
    store = VersionedStore()
    asyncio.run(restore(tmp_path, FsyncPolicy.NO, store).close())
    assert len(store.requests) == 0 and "damaged" in caplog.text
