"""When a follower gives freed memory back: once per bulk of applied entries, not per batch."""

from kv.storage.heap import TrimAfterBulk


def test_a_trim_is_due_once_the_threshold_is_reached():
    trimmer = TrimAfterBulk(threshold=100, delay=0.5)
    assert not trimmer.applied(60)
    assert trimmer.applied(40)  # the 100th entry: the caller schedules trim() in 0.5 s


def test_batches_while_a_trim_is_scheduled_do_not_schedule_another():
    trimmer = TrimAfterBulk(threshold=100)
    assert trimmer.applied(1_000)
    assert not trimmer.applied(1_000)
    trimmer.trim()
    assert trimmer.trims == 1 and trimmer.pending == 0
    assert not trimmer.applied(99)
    assert trimmer.applied(1)


def test_steady_writes_trim_rarely():
    trimmer = TrimAfterBulk(threshold=10_000)
    due = 0
    for _ in range(30_000):  # single-entry batches
        if trimmer.applied(1):
            due += 1
            trimmer.trim()
    assert due == 3
