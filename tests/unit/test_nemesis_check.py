"""The nemesis's history checker (tools/nemesis.py), on histories written by hand.

A false alarm here fails CI for a store that did nothing wrong, and a missed one hides a
lost write, so both directions are pinned down.
"""

from __future__ import annotations

from tools.nemesis import History, Operation, check

FOLLOWER = "http://127.0.0.1:9001"


def acked_write(version: int, started: float = 1.0) -> Operation:
    return Operation("write", "k", version, 2, started, started + 0.1, 200, version, [FOLLOWER])


def final_state(store: dict, versions: dict) -> dict:
    state = {"store": store, "versions": versions}
    return {"states": [state, state], "converged": True, "seconds": 0.0}


def test_an_acknowledged_write_the_leader_holds_is_fine():
    history = History(operations=[acked_write(5)])
    assert check(history, final_state({"k": 5}, {"k": 5})) == ([], 1)


def test_an_acknowledged_write_missing_without_any_later_delete_is_lost():
    history = History(operations=[acked_write(5)])
    anomalies, _ = check(history, final_state({}, {}))
    assert anomalies == ["acknowledged write lost: k@5 (holds None)"]


def test_an_older_version_left_behind_is_lost_whatever_else_happened():
    unanswered = Operation("delete", "k", None, 2, 1.05, 1.3, None)
    history = History(operations=[acked_write(5), unanswered])
    anomalies, _ = check(history, final_state({"k": 3}, {"k": 3}))
    assert anomalies == ["acknowledged write lost: k@5 (holds 3)"]


def test_a_newer_delete_with_a_version_explains_an_absent_key():
    delete = Operation("delete", "k", None, 0, 2.0, 2.1, 200, 6)
    history = History(operations=[acked_write(5), delete])
    assert check(history, final_state({}, {}))[0] == []


def test_an_unanswered_delete_still_in_flight_may_have_taken_effect():
    """The case CI met: the leader applied and replicated the delete, then was killed
    before it answered, so the client never learnt its version."""
    unanswered = Operation("delete", "k", None, 2, 1.05, 1.3, None)
    history = History(operations=[acked_write(5, started=1.0), unanswered])
    assert check(history, final_state({}, {}))[0] == []


def test_an_unanswered_delete_that_ended_before_the_write_began_explains_nothing():
    unanswered = Operation("delete", "k", None, 2, 0.2, 0.5, None)
    history = History(operations=[unanswered, acked_write(5, started=1.0)])
    anomalies, _ = check(history, final_state({}, {}))
    assert anomalies == ["acknowledged write lost: k@5 (holds None)"]


def test_an_older_delete_or_another_keys_delete_explains_nothing():
    older = Operation("delete", "k", None, 2, 0.2, 0.3, 200, 4)
    other_key = Operation("delete", "j", None, 2, 1.05, 1.3, None)
    history = History(operations=[older, acked_write(5), other_key])
    anomalies, _ = check(history, final_state({}, {}))
    assert anomalies == ["acknowledged write lost: k@5 (holds None)"]


def test_an_answered_404_delete_explains_nothing():
    missing = Operation("delete", "k", None, 2, 1.05, 1.3, 404)
    history = History(operations=[acked_write(5), missing])
    anomalies, _ = check(history, final_state({}, {}))
    assert anomalies == ["acknowledged write lost: k@5 (holds None)"]
