"""The counters behind /metrics: histogram buckets with Prometheus's `le` semantics."""

import pytest

from kv.core.stats import LatencyHistogram, WriteFailure, WriteStats


def test_a_value_on_a_bound_is_in_that_bucket_and_buckets_are_cumulative():
    histogram = LatencyHistogram(bounds=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert histogram.count == 5 and histogram.total == pytest.approx(8.65)


def test_bounds_must_be_sorted():
    with pytest.raises(ValueError, match="sorted"):
        LatencyHistogram(bounds=(1.0, 0.1))


def test_write_stats_keep_a_histogram_per_quorum_and_failures_by_reason():
    stats = WriteStats()
    stats.acknowledged(3, 0.004)
    stats.acknowledged(3, 0.006)
    stats.acknowledged(1, 0.001)
    stats.failed(WriteFailure.NOT_IN_TIME)
    assert {q: h.count for q, h in stats.latency_by_quorum.items()} == {3: 2, 1: 1}
    assert stats.failures[WriteFailure.NOT_IN_TIME] == 1
    assert stats.failures[WriteFailure.STARTING] == 0
