"""Terms, the start-up read quorum, the merge rule and fencing, as plain state machines."""

import pytest

from kv.core.records import TERM_STRIDE, Entry, TermExhaustedError, first_version, term_of
from kv.core.startup import StartupMerge, TermFence, merge_entries
from kv.core.store import VersionedStore
from kv.settings import LeaderSettings, default_startup_quorum


def test_versions_carry_their_term_and_order_by_term_first():
    assert first_version(1) == 1 and term_of(1) == 1
    assert term_of(TERM_STRIDE) == 1 and term_of(TERM_STRIDE + 1) == 2
    assert first_version(3) == 2 * TERM_STRIDE + 1
    assert term_of(0) == 0
    # Any version of term 2 is newer than every version of term 1.
    assert first_version(2) > TERM_STRIDE


def test_a_new_term_starts_above_everything_and_never_reuses_a_version():
    store = VersionedStore()
    store.begin_term(1)
    assert [store.put("k", i).version for i in range(3)] == [1, 2, 3]
    store.begin_term(2)
    assert store.put("k", "x").version == first_version(2)
    with pytest.raises(ValueError, match="not newer"):
        store.begin_term(2)


def test_a_term_whose_versions_are_used_up_must_be_replaced():
    store = VersionedStore()
    store.begin_term(1)
    store.advance_to(TERM_STRIDE)  # the last version of term 1
    with pytest.raises(TermExhaustedError):
        store.put("k", 1)


def test_holds_is_the_confirmation_rule():
    store = VersionedStore()
    store.maybe_apply(Entry.create("k", "a", 5))
    assert store.holds(Entry.create("k", "a", 5))
    assert store.holds(Entry.create("k", "old", 4)), "a newer write supersedes it"
    assert not store.holds(Entry.create("k", "b", 5)), "same version, another write"
    assert not store.holds(Entry.create("other", 1, 1))


def test_startup_quorum_intersects_every_write_quorum():
    assert default_startup_quorum(5, 3) == 3
    assert default_startup_quorum(5, 1) == 5
    assert default_startup_quorum(5, 5) == 1
    assert default_startup_quorum(2, 0) == 2, "w=0: read every follower (at most N)"
    assert default_startup_quorum(0, 0) == 0
    for n in range(1, 7):
        for w in range(0, n + 1):
            s = default_startup_quorum(n, w)
            assert s + w > n or w == 0, "some follower is in both sets"


def test_settings_default_and_check_startup_quorum():
    followers = [f"http://127.0.0.1:{9000 + i}" for i in range(5)]
    assert LeaderSettings(followers=followers, write_quorum=3).startup_quorum == 3
    assert LeaderSettings(followers=followers, startup_quorum=1).startup_quorum == 1
    with pytest.raises(ValueError, match="STARTUP_QUORUM is 6"):
        LeaderSettings(followers=followers, startup_quorum=6)


def reported(merge: StartupMerge, url: str, entries: list[Entry], term: int) -> None:
    merge.merge_page(url, entries)
    last = max((e.version for e in entries), default=0)
    merge.finish(url, f"node-{url}", term, last)


def test_startup_merge_keeps_the_newest_of_each_key_and_picks_a_newer_term():
    store = VersionedStore()
    merge = StartupMerge(store, quorum=2, persisted_term=1)
    reported(merge, "a", [Entry.create("x", 1, 1), Entry.create("y", 1, 2)], term=2)
    assert not merge.read_enough and "1 of the 2" in merge.waiting_reason(3)
    deleted_y = Entry.create("y", None, first_version(2) + 4, deleted=True)
    reported(merge, "b", [Entry.create("x", 2, 3), deleted_y], term=2)
    assert merge.read_enough and not merge.ready, "not before the new term is recorded"
    assert store.get("x") is not None and store.get("x").value == 2  # type: ignore[union-attr]
    assert store.get("y") is None, "a deletion is never undone by an older write"
    assert merge.new_term() == 3
    assert not merge.followers_in_sync()["a"][1] and merge.followers_in_sync()["b"][1], (
        "b held every newest entry"
    )
    assert merge.restamp == []
    adopted = merge.adopted()  # as the store holds them now, not as they were read
    assert [(e.key, e.version) for e in adopted] == [
        ("x", 3),
        ("y", first_version(2) + 4),
        ("x", 3),
        ("y", first_version(2) + 4),
    ]
    assert [(e.key, e.version) for e in adopted.newest(5)] == [
        ("y", first_version(2) + 4),
        ("x", 3),
    ]


def test_a_starting_leader_is_ready_once_its_read_quorum_holds_the_new_term():
    store = VersionedStore()
    merge = StartupMerge(store, quorum=2)
    reported(merge, "a", [], term=3)
    reported(merge, "b", [], term=1)
    term = merge.choose_term()
    assert term == 4
    merge.claimed("a", term)
    assert not merge.ready and "1 of the 2" in merge.waiting_reason(3)
    merge.forget("b")  # its claim failed: it must be read again
    assert not merge.read_enough
    reported(merge, "c", [], term=5)  # ...and someone read since has seen a newer term
    assert merge.choose_term() == 6 and merge.claims == set()
    merge.claimed("a", 6)
    merge.claimed("c", 6)
    assert merge.ready


def test_startup_merge_term_is_above_the_persisted_one_and_every_version():
    store = VersionedStore()
    merge = StartupMerge(store, quorum=1, persisted_term=7)
    reported(merge, "a", [Entry.create("x", 1, first_version(9) + 2)], term=4)
    assert merge.new_term() == 10


def test_a_follower_that_held_exactly_the_merged_store_is_in_sync():
    store = VersionedStore()
    merge = StartupMerge(store, quorum=2)
    entries = [Entry.create("x", 1, 1), Entry.create("y", 2, 2)]
    reported(merge, "a", entries, term=1)
    reported(merge, "b", entries[:1], term=1)
    in_sync = {url: held_all for url, (_, held_all) in merge.followers_in_sync().items()}
    assert in_sync == {"a": True, "b": False}


def test_merge_prefers_the_leaders_own_later_write_over_an_older_leaders():
    store = VersionedStore()
    store.begin_term(2)
    own = store.put("k", "mine")
    late = Entry.create("k", "theirs", own.version + 5)  # an older leader of a colliding term
    outcome = merge_entries(store, [late], own_terms={2})
    assert outcome.restamp == [own] and outcome.adopted == []
    assert store.get("k") == own, "the leader keeps its own write, to be written again"
    assert store.next_version() > late.version


def test_merge_restamps_one_version_held_with_two_contents():
    store = VersionedStore()
    mine = Entry.create("k", "a", 7)
    store.maybe_apply(mine)
    outcome = merge_entries(store, [Entry.create("k", "b", 7)], own_terms=set())
    assert outcome.restamp == [mine]


def test_merge_adopts_newer_entries_of_other_leaders_and_ignores_older_ones():
    store = VersionedStore()
    store.maybe_apply(Entry.create("k", "old", 3))
    outcome = merge_entries(
        store, [Entry.create("k", "new", 4), Entry.create("j", "x", 1)], own_terms=set()
    )
    assert [e.key for e in outcome.adopted] == ["k", "j"]
    assert merge_entries(store, [Entry.create("k", "older", 2)], own_terms=set()).adopted == []


def test_rewrite_gives_a_held_write_a_new_version():
    store = VersionedStore()
    store.begin_term(1)
    store.put("k", "v")
    tombstone = store.delete("k")
    assert tombstone is not None
    again = store.rewrite(tombstone)
    assert again.deleted and again.version > tombstone.version and store.get("k") is None


def test_fence_refuses_older_terms_and_other_leaders_of_the_same_term():
    fence = TermFence()
    assert fence.check(1, "a") is None and fence.observe(1, "a")
    assert fence.check(1, "a") is None and not fence.observe(1, "a")
    refusal = fence.check(1, "b")
    assert refusal is not None and "another leader" in refusal
    assert fence.observe(3, "c") and fence.term == 3
    refusal = fence.check(2, "a")
    assert refusal is not None and "term 2" in refusal and "term 3" in refusal
    assert fence.check(None, None) is None, "a hand-made batch is not fenced"


def test_a_reading_leader_claims_the_current_term():
    fence = TermFence(term=4, leader_id="old")
    assert fence.claim("new") and not fence.claim("new")
    assert fence.check(4, "old") is not None, "the previous leader's stray batches bounce"
    assert fence.check(5, "new") is None


def test_paging_visits_every_entry_once_in_version_order():
    store = VersionedStore()
    for i in range(25):
        store.maybe_apply(Entry.create(f"k{i}", i, 100 - i))
    seen: list[int] = []
    after = 0
    while page := store.page(after, 7):
        seen += [e.version for e in page]
        after = page[-1].version
    assert seen == sorted(seen) and len(seen) == 25
