"""Check-quorum's rule (kv/core/contact.py): when a leader has lost touch with its quorum."""

from __future__ import annotations

import math

from kv.core.contact import quorum_heard_at, quorum_lost
from kv.core.progress import Confirmation, FollowerProgress


def test_the_quorum_is_heard_at_its_wth_most_recent_answer() -> None:
    assert quorum_heard_at([5.0, 9.0, 7.0], 2) == 7.0
    assert quorum_heard_at([5.0, 9.0, 7.0], 3) == 5.0
    assert quorum_heard_at([5.0], 2) == -math.inf  # fewer followers than the quorum
    assert quorum_heard_at([], 0) == math.inf  # W = 0 needs nobody


def test_a_leader_that_hears_from_w_followers_keeps_leading() -> None:
    # Two of three answer all the time; the third is cut off for good.
    heard = [100.0, 99.8, -math.inf]
    assert quorum_lost(heard, 2, now=100.1, window_s=1.5, since=0.0) is None


def test_a_leader_that_hears_from_fewer_than_w_steps_down_after_the_window() -> None:
    heard = [100.0, 98.0, 97.0]
    assert quorum_lost(heard, 2, now=99.4, window_s=1.5, since=0.0) is None
    reason = quorum_lost(heard, 2, now=99.6, window_s=1.5, since=0.0)
    assert reason == (
        "check-quorum: heard from only 1 of the 2 followers WRITE_QUORUM needs in the last 1500 ms"
    )


def test_the_window_opens_when_the_leader_began_taking_writes() -> None:
    # Just promoted: nobody heard yet, but the window counts from `since`.
    assert quorum_lost([-math.inf] * 3, 2, now=10.0, window_s=1.5, since=9.0) is None
    assert quorum_lost([-math.inf] * 3, 2, now=10.6, window_s=1.5, since=9.0) is not None


def test_zero_turns_it_off_and_w_zero_never_steps_down() -> None:
    assert quorum_lost([-math.inf], 1, now=1e9, window_s=0, since=0.0) is None
    assert quorum_lost([-math.inf], 0, now=1e9, window_s=1.5, since=0.0) is None


def test_every_answer_counts_as_hearing_from_a_follower() -> None:
    progress = FollowerProgress(lambda: [])
    assert progress.last_heard == -math.inf
    progress.sending([], 1.0)
    progress.handle_success([], Confirmation("node", 0), 1.2)  # a heartbeat
    assert progress.last_heard == 1.2
    progress.handle_failure([], 3.0, "no answer within 500 ms")
    assert progress.last_heard == 1.2  # a failure is not hearing from it
    progress.adopt("node", True, 4.0)  # read at start-up
    assert progress.last_heard == 4.0
