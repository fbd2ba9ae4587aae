"""The nemesis's history checkers (tools/nemesis.py, tools/nemesis_net.py), on histories
written by hand.

A false alarm here fails CI for a store that did nothing wrong, and a missed one hides a
lost write, so both directions are pinned down.
"""

from __future__ import annotations

from pathlib import Path

from tools.history import HistoryRecorder
from tools.nemesis import History, Operation, check
from tools.nemesis_clients import Answer, Observations
from tools.nemesis_net import NetRun, invariants

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


# -- the --net mode's invariants (tools/nemesis_net.py) -------------------------------------

LEADER, OTHER = "http://10.0.0.11:8000", "http://10.0.0.12:8000"
TERM_2 = 10**9 + 1  # the first version of term 2 (kv/core/records.py)


def net_run(*acks: tuple[str, int, str], store: dict | None = None) -> NetRun:
    """A run whose clients had `acks` (key, version, node) acknowledged, one op each."""
    run = NetRun(Path("."), HistoryRecorder(clock=iter(range(1000)).__next__), Observations())
    for key, version, node in acks:
        op = run.recorder.invoke(0, "write", key, f"v{version}")
        run.recorder.ok(op, version=version, node=node)
        answer = Answer(key, f"v{version}", False, version, node, 200, op, (node,))
        run.seen.answers.append(answer)
        run.seen.acks.append(answer)
    held = store if store is not None else {key: version for key, version, _ in acks}
    state = {"store": held, "versions": held}
    run.final = {"states": [state, state], "converged": True, "seconds": 0.0}
    return run


def test_net_writes_kept_by_one_leader_a_term_are_fine():
    run = net_run(("a", 5, LEADER), ("b", TERM_2, OTHER))
    assert invariants(run) == ([], 2)


def test_net_two_nodes_acknowledging_in_one_term_is_an_anomaly():
    anomalies, _ = invariants(net_run(("a", 5, LEADER), ("b", 6, OTHER)))
    assert anomalies == [f"term 1 acknowledged by 2 nodes: {sorted([LEADER, OTHER])}"]


def test_net_a_replay_of_an_older_terms_version_by_the_next_leader_is_fine():
    run = net_run(("a", 5, LEADER), ("b", 6, LEADER))
    retried = run.seen.acks[1]
    run.seen.acks[1] = Answer("b", "v6", False, 6, OTHER, 200, retried.op, (OTHER,), True)
    assert invariants(run)[0] == []


def test_net_an_acknowledged_write_missing_at_the_end_is_lost():
    anomalies, _ = invariants(net_run(("a", 5, LEADER), store={}))
    assert anomalies == ["acknowledged write lost: a@5 (holds None)"]


def test_net_a_repeat_given_a_new_version_applied_its_key_twice():
    run = net_run(("a", 5, LEADER))
    run.seen.replays += [(0, 5, 200, 5), (0, 5, 503, 5), (0, 5, 503, None), (0, 5, 200, 7)]
    anomalies, _ = invariants(run)
    assert anomalies == [
        "op 0: its Idempotency-Key was applied again as version 7 (HTTP 200) after version 5"
    ]


def test_net_a_repeat_refused_with_412_is_an_anomaly():
    run = net_run(("a", 5, LEADER))
    run.seen.replays.append((0, 5, 412, None))
    assert len(invariants(run)[0]) == 1


def test_net_a_read_of_a_version_with_another_value_is_an_anomaly():
    run = net_run(("a", 5, LEADER))
    run.seen.answers.append(Answer("a", "v5", False, 5, OTHER, 200, None))
    assert invariants(run)[0] == []
    run.seen.answers.append(Answer("a", "other", False, 5, OTHER, 200, None))
    assert len(invariants(run)[0]) == 1
