"""The HA node's pure parts: the cycle's decision, who campaigns first, the lease clock,
the promoted node's read quorum, an etcd-granted term, and the settings."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pydantic import ValidationError

from kv.core.records import Entry
from kv.core.startup import StartupMerge, TermTooLowError
from kv.core.store import VersionedStore
from kv.ha.decide import (
    Action,
    Candidate,
    ClusterView,
    LeaderRecord,
    Me,
    Role,
    campaign_delay,
    decide,
    pre_vote,
)
from kv.ha.lease import LeaseClock, keepalive_timeout
from kv.leader.node import LeaderCore
from kv.settings import HASettings, promoted_startup_quorum

N1 = LeaderRecord("n1", "http://127.0.0.1:1", 4, lease=7)
N2 = LeaderRecord("n2", "http://127.0.0.1:2", 5, lease=9)


def me(
    role: Role = Role.FOLLOWER, lease: int | None = None, valid: bool = False, priority: int = 1
) -> Me:
    return Me("n1", role, lease, valid, priority)


# -- decide ---------------------------------------------------------------------------------


def test_a_follower_follows_the_leader_etcd_names() -> None:
    decision = decide(ClusterView(N2, 5), me())
    assert decision.action is Action.FOLLOW and decision.leader == N2
    assert decision.sentence == "following n2 at http://127.0.0.1:2 (term 5)"


def test_a_vacant_key_makes_a_follower_campaign_unless_its_priority_is_zero() -> None:
    assert decide(ClusterView(None, 5), me()).action is Action.CAMPAIGN
    waiting = decide(ClusterView(None, 5), me(priority=0))
    assert waiting.action is Action.WAIT and "FAILOVER_PRIORITY=0" in waiting.sentence


def test_the_leader_with_its_lease_does_nothing() -> None:
    decision = decide(ClusterView(N1, 4), me(Role.LEADER, lease=7, valid=True))
    assert decision.action is Action.LEAD
    assert decision.sentence == "no action: I am n1, the leader with the lease"


@pytest.mark.parametrize(
    ("view", "valid", "says"),
    [
        (ClusterView(N1, 4), False, "lease ran out"),
        (ClusterView(N2, 5), True, "n2 leads in term 5"),
        (ClusterView(None, 4), True, "leader key is gone"),
        (None, False, "cannot reach etcd"),
    ],
)
def test_a_leader_steps_down(view: ClusterView | None, valid: bool, says: str) -> None:
    decision = decide(view, me(Role.LEADER, lease=7, valid=valid), "cannot reach etcd at x")
    assert decision.action is Action.STEP_DOWN and says in decision.sentence


def test_a_leader_cut_off_from_etcd_leads_on_while_its_lease_lasts() -> None:
    decision = decide(None, me(Role.LEADER, lease=7, valid=True), "cannot reach etcd at x")
    assert decision.action is Action.LEAD


def test_a_follower_cut_off_from_etcd_waits() -> None:
    decision = decide(None, me(), "cannot reach etcd at x")
    assert decision.action is Action.WAIT and "no election" in decision.sentence


def test_a_key_on_a_lease_this_node_held_before_is_released() -> None:
    # Restarted with DATA_DIR: etcd still names this node, on a lease it recorded there.
    earlier = Me("n1", Role.FOLLOWER, None, False, 1, earlier_leases=frozenset({7}))
    assert decide(ClusterView(N1, 4), earlier).action is Action.RELEASE
    leading = Me("n1", Role.LEADER, 8, True, 1, earlier_leases=frozenset({7, 8}))
    assert decide(ClusterView(N1, 4), leading).action is Action.RELEASE


def test_revocation_is_by_lease_never_by_name() -> None:
    # The key names this node on a lease it never held: another process named n1, or an
    # earlier one without DATA_DIR. Wait for it to expire; never revoke it.
    decision = decide(ClusterView(N1, 4), me())
    assert decision.action is Action.WAIT and "never held" in decision.sentence
    decision = decide(ClusterView(N1, 4), me(Role.LEADER, lease=8, valid=True))
    assert decision.action is Action.WAIT


def test_check_quorum_steps_a_leader_down_though_it_holds_the_lease() -> None:
    lost = "check-quorum: heard from only 0 of the 2 followers WRITE_QUORUM needs"
    leading = Me("n1", Role.LEADER, 7, True, 1, cannot_lead=lost)
    decision = decide(ClusterView(N1, 4), leading)
    assert decision.action is Action.STEP_DOWN and decision.sentence == f"stepped down: {lost}"
    assert decide(None, leading, "cannot reach etcd at x").action is Action.STEP_DOWN


# -- who campaigns first ----------------------------------------------------------------------


def test_the_most_up_to_date_candidate_campaigns_at_once_and_the_others_wait() -> None:
    current = Candidate("a", 90, 90, 1)
    lagging = Candidate("b", 40, 90, 1)
    behind = Candidate("c", 10, 10, 1)
    assert campaign_delay(current, [lagging, behind], 0.3) == (0.0, "no better-placed peer")
    assert campaign_delay(lagging, [current, behind], 0.3) == (0.3, "a is ahead")
    delay, why = campaign_delay(behind, [current, lagging], 0.3)
    assert delay == pytest.approx(0.6) and why == "a, b are ahead"


def test_a_peer_that_did_not_answer_is_waited_for_not_taken_for_dead() -> None:
    mine = Candidate("a", 5, 5, 1)
    delay, why = campaign_delay(mine, [Candidate("b", 1, 1, 1)], 0.3, unknown=["c"])
    assert delay == pytest.approx(0.3) and why == "c did not answer, so it may be"
    delay, why = campaign_delay(mine, [Candidate("b", 9, 9, 1)], 0.3, unknown=["d", "c"])
    assert delay == pytest.approx(0.9) and why == "b is ahead; c, d did not answer, so they may be"


def test_pre_vote_refuses_a_node_that_cannot_reach_its_start_up_read() -> None:
    assert pre_vote(["b", "c"], 2, 5) is None
    assert pre_vote([], 0, 1) is None  # two nodes: the survivor reads no one
    refusal = pre_vote(["b"], 2, 5)
    assert refusal == "not campaigning: reached 1 of 5 peers, and a start-up read needs 2"


def test_priority_breaks_ties_and_zero_never_counts() -> None:
    mine = Candidate("a", 5, 5, 1)
    assert campaign_delay(mine, [Candidate("b", 5, 5, 2)], 0.1)[0] == 0.1
    assert campaign_delay(mine, [Candidate("b", 9, 9, 0)], 0.1)[0] == 0.0
    assert campaign_delay(mine, [Candidate("b", 5, 5, 1)], 0.1)[0] == 0.0  # a tie: both go


# -- the lease clock ----------------------------------------------------------------------------


def test_the_lease_counts_from_when_the_keepalive_was_sent_less_the_margin() -> None:
    lease = LeaseClock(margin_s=0.5)
    assert not lease.valid(0.0) and lease.refusal(0.0) == "this node holds no lease"
    lease.renewed(sent_at=10.0, ttl_s=2)
    assert lease.valid(11.49) and not lease.valid(11.5)
    assert lease.remaining(11.0) == pytest.approx(0.5)
    lease.lost_reason = "cannot reach etcd at x"
    refusal = lease.refusal(12.0)
    assert (
        refusal is not None and "ran out 0.50 s ago" in refusal and "cannot reach etcd" in refusal
    )


def test_an_answer_to_an_older_keepalive_never_shortens_the_lease() -> None:
    lease = LeaseClock(margin_s=0.5)
    lease.renewed(10.0, 2)
    lease.renewed(9.0, 2)  # answered late, sent earlier
    assert lease.deadline == 11.5


def test_losing_the_lease_refuses_at_once() -> None:
    lease = LeaseClock(margin_s=0.5)
    lease.renewed(10.0, 2)
    lease.lose("handed over")
    assert not lease.valid(10.1) and lease.refusal(10.1) == "handed over"


def test_a_keepalive_to_a_dead_member_leaves_time_for_the_next_before_the_lease_lapses() -> None:
    """Renewed every 0.5 s with a 1.5 s window: 1.0 s is left when the keepalive goes out.
    A member that never answers may take half; the next answers with the lease still good."""
    lease = LeaseClock(margin_s=0.5)
    lease.renewed(10.0, 2)  # good until 11.5
    sent = 10.5
    first = keepalive_timeout(lease.remaining(sent), endpoints=3)
    assert first == 0.5
    next_answer = sent + first + 0.2  # the second member, 200 ms later
    assert lease.valid(next_answer)
    lease.renewed(sent, 2)
    assert lease.deadline == 12.0


def test_one_etcd_endpoint_gets_all_the_time_left_within_bounds() -> None:
    assert keepalive_timeout(0.8, endpoints=1) == 0.8
    assert keepalive_timeout(5.0, endpoints=1) == 1.0
    assert keepalive_timeout(0.0, endpoints=3) == 0.05


# -- promotion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("followers", range(1, 8))
def test_a_promoted_node_and_its_read_quorum_meet_every_write_quorum(followers: int) -> None:
    """Exhaustively: for every W, old leader, new leader and read set of the size chosen,
    the read set plus the new leader meets every set of W followers of the old leader."""
    nodes = range(followers + 1)
    for w in range(1, followers + 1):
        reads = promoted_startup_quorum(followers, w)
        for old, new in itertools.permutations(nodes, 2):
            confirmers_of_old = [n for n in nodes if n != old]
            peers_of_new = [n for n in nodes if n != new]
            for read in itertools.combinations(peers_of_new, reads):
                copies = {new, *read}
                for acked in itertools.combinations(confirmers_of_old, w):
                    assert old in copies or copies & set(acked), (followers, w, read, acked)


def test_the_read_quorum_never_needs_the_old_leader() -> None:
    assert promoted_startup_quorum(5, 3) == 2
    assert promoted_startup_quorum(5, 0) == 4  # all but the dead old leader
    assert promoted_startup_quorum(1, 1) == 0  # two nodes: the survivor holds everything


def test_a_promoted_leader_uses_the_term_etcd_granted() -> None:
    store = VersionedStore()
    store.maybe_apply(Entry("a", 1, 3 * 1_000_000_000 + 5))  # term 4
    merge = StartupMerge(store, quorum=0, granted_term=7)
    assert merge.choose_term() == 7


def test_a_granted_term_that_is_not_above_everything_read_is_refused() -> None:
    store = VersionedStore()
    merge = StartupMerge(store, quorum=1, granted_term=3)
    merge.merge_page("f", [Entry("a", 1, 4 * 1_000_000_000 + 1)])  # term 5, held by a follower
    merge.finish("f", "node", 5, 4 * 1_000_000_000 + 1)
    with pytest.raises(TermTooLowError) as raised:
        merge.choose_term()
    assert raised.value.needed == 6
    merge.granted_term = 6
    assert merge.choose_term() == 6


def test_an_elected_leader_steps_down_instead_of_picking_a_term_itself() -> None:
    seen: list[int] = []
    core = LeaderCore(VersionedStore(), 0, deposed=seen.append)
    core.begin_term(3)
    core.observe_term(5, foreign=True)
    assert seen == [5] and core.term == 3
    fixed = LeaderCore(VersionedStore(), 0)
    fixed.begin_term(3)
    fixed.observe_term(5, foreign=True)
    assert fixed.term == 6  # a fixed leader moves above it, as before


# -- settings ------------------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "node_name": "b",
    "cluster": "a=http://127.0.0.1:8000, b=127.0.0.1:8001 ,c=http://127.0.0.1:8002/",
    "etcd_endpoints": "http://127.0.0.1:2379,127.0.0.1:22379",
}


def test_the_cluster_and_endpoints_parse() -> None:
    settings = HASettings(**GOOD)
    assert settings.url == "http://127.0.0.1:8001"
    assert settings.peers == {"a": "http://127.0.0.1:8000", "c": "http://127.0.0.1:8002"}
    assert settings.etcd_endpoints == ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
    assert settings.quorum == 2  # the default 3, capped at two followers
    leader = settings.leader_settings()
    assert leader.followers == ["http://127.0.0.1:8000", "http://127.0.0.1:8002"]
    assert leader.startup_quorum == 0 and leader.quorum == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"node_name": "z"}, "NODE_NAME 'z' is not in CLUSTER"),
        ({"cluster": "a=http://127.0.0.1:1"}, "at least two nodes"),
        ({"cluster": "a=http://127.0.0.1:1,a=http://127.0.0.1:2"}, "more than once"),
        ({"cluster": "a=http://127.0.0.1:1,b=http://127.0.0.1:1"}, "more than once"),
        ({"cluster": "a=ftp://x:1,b=http://127.0.0.1:2"}, "not an http(s) URL"),
        ({"etcd_endpoints": ""}, "ETCD_ENDPOINTS is required"),
        ({"write_quorum": 3}, "WRITE_QUORUM is 3"),
        ({"lease_ttl_s": 1}, "greater than or equal to 2"),
        ({"lease_margin_ms": 2000}, "LEASE_MARGIN_MS"),
        ({"lease_renew_ms": 800}, "LEASE_RENEW_MS (800) must be at most half"),
        ({"lease_ttl_s": 3, "lease_renew_ms": 1300}, "LEASE_RENEW_MS (1300)"),
        ({"check_quorum_ms": 400}, "CHECK_QUORUM_MS (400) must be 0 (off) or at least 1000"),
        ({"startup_timeout_ms": 0}, "greater than 0"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(change: dict, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        HASettings(**(GOOD | change))
    assert message in str(raised.value)


def test_check_quorum_and_the_start_up_deadline_derive_from_the_lease() -> None:
    settings = HASettings(**GOOD)
    assert settings.check_quorum_s == pytest.approx(1.5)  # TTL 2 s less the 500 ms margin
    assert settings.startup_timeout_s == pytest.approx(4.0)
    assert HASettings(**GOOD, lease_ttl_s=5).check_quorum_s == pytest.approx(4.5)
    assert HASettings(**GOOD, check_quorum_ms=0).check_quorum_s == 0  # off
    assert HASettings(**GOOD, lease_renew_ms=750).lease_renew_ms == 750  # half of 1.5 s


def test_a_follower_fenced_by_the_read_itself_does_not_make_the_granted_term_too_low() -> None:
    # An elected leader reads with its granted term, so each follower reports that term back.
    store = VersionedStore()
    merge = StartupMerge(store, quorum=1, granted_term=7)
    merge.merge_page("f", [])
    merge.finish("f", "node", 7, 0)
    assert merge.choose_term() == 7
