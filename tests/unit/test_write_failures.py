"""Why a write missed its quorum: the reason counted in the metrics, and the causes told."""

from kv.core.stats import WriteFailure
from kv.network.delivery import OVERFLOWED, Delivery, QuorumOutcome
from kv.web.writes import missed_because, why_missed


def outcome(*errors: str | None, required: int = 3) -> QuorumOutcome:
    deliveries = [
        Delivery(f"f{i}", ok=error is None, delay_ms=0, latency_ms=1, attempts=1, error=error)
        for i, error in enumerate(errors)
    ]
    return QuorumOutcome(required, deliveries)


def test_a_reached_quorum_missed_nothing() -> None:
    assert why_missed(outcome(None, None, None), reachable=3) is None


def test_too_few_reachable_followers_is_told() -> None:
    missed = outcome("timeout", "timeout", "timeout")
    assert why_missed(missed, reachable=0) is WriteFailure.UNREACHABLE
    assert missed_because(missed, 0, 5, 100) == ["only 0 of 5 followers are reachable"]


def test_reachable_followers_that_were_slow_were_not_in_time() -> None:
    missed = outcome(None, "timeout", "timeout")
    assert why_missed(missed, reachable=5) is WriteFailure.NOT_IN_TIME
    assert missed_because(missed, 5, 5, 100) == ["not in time"]


def test_an_overflow_among_down_followers_tells_both_causes() -> None:
    # Every follower frozen: the write that overflows their queues is missed because
    # they are down, and it also turned their queues into snapshots. Both are said.
    missed = outcome(OVERFLOWED, OVERFLOWED, "timeout")
    assert why_missed(missed, reachable=0) is WriteFailure.OVERFLOW
    causes = missed_because(missed, 0, 3, 2000)
    assert causes[0] == "only 0 of 3 followers are reachable"
    assert causes[1].startswith("2 follower(s) had failed to take MAX_REPLICATION_QUEUE=2000")
    assert len(causes) == 2
