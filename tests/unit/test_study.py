"""The quorum study's statistics: percentiles, the order statistic, the overhead above it."""

import pytest

from kv.core.outbox import DelayModel
from tools import study


def result(quorum: int, latency_ms: float, delays: list[float], status: int = 200):
    return study.WriteResult(quorum, 0, "k", status, latency_ms, None, len(delays), 1, delays)


def test_percentile_interpolates_like_numpy():
    samples = [float(x) for x in range(1, 101)]
    assert study.percentile(samples, 50) == pytest.approx(50.5)
    assert study.percentile(samples, 99) == pytest.approx(99.01)
    assert study.percentile([7.0], 95) == 7.0


def test_overhead_is_latency_minus_the_kth_smallest_reported_delay():
    write = result(quorum=2, latency_ms=130.0, delays=[300.0, 120.0, 40.0])
    assert write.kth_delay_ms() == 120.0
    assert write.overhead_ms() == pytest.approx(10.0)
    assert result(quorum=3, latency_ms=1.0, delays=[1.0]).overhead_ms() is None
    assert result(quorum=1, latency_ms=9.0, delays=[1.0], status=503).overhead_ms() is None


def test_summary_counts_failures_and_uses_the_order_statistic():
    writes = [result(3, 500.0 + i, [100.0, 200.0, 495.0 + i]) for i in range(10)]
    writes.append(result(3, 5000.0, [1.0], status=503))
    summary = study.summarise(3, writes, DelayModel(0, 1000), n=5)
    assert (summary.writes, summary.failures) == (11, 1)
    assert summary.expected_ms == pytest.approx(500.0)
    assert summary.mean_ms == pytest.approx(504.5)
    assert summary.overhead_p50_ms == pytest.approx(5.0)


def test_the_staleness_prediction_matches_a_simulation_of_the_delay_model():
    """PBS's closed form (tools/pbs.py) against a Monte Carlo of the same model."""
    import random

    from tools.pbs import p_fresh

    rng = random.Random(7)
    n, trials = 5, 40_000
    for quorum, t in ((1, 0.0), (2, 150.0), (3, 400.0), (4, 50.0)):
        fresh = 0
        for _ in range(trials):
            delays = sorted(rng.uniform(0, 1000) for _ in range(n))
            fresh += rng.choice(delays) <= delays[quorum - 1] + t
        assert abs(fresh / trials - p_fresh(t, quorum, n, 0, 1000)) < 0.01
    assert p_fresh(0, 1, 5, 0, 1000) == pytest.approx(0.2)
    assert p_fresh(1000, 1, 5, 0, 1000) == pytest.approx(1.0)
    assert p_fresh(0, 5, 5, 0, 1000) == 1.0
