"""Partitions of a four-node HA cluster (W=2) and a three-member etcd, each host in a
network namespace of its own (tools/netlab), under a few writers.

Every test runs one scenario of tools/netlab/scenarios.py on the module's cluster, which
the scenario heals again, and asserts what clients saw: after the heal no acknowledged
write is lost, no version was acknowledged twice, one node acknowledged per term, and every
replica holds the same data (:func:`assert_safe`); then the scenario's own promise.

"The majority side" is the side of the fault with etcd and a quorum of nodes; its first
acknowledged write after the fault is what a client waits for.
"""

from __future__ import annotations

import pytest

from tools.netlab.cluster import ETCD_CLIENT_PORT, NODE_PORT, NetCluster
from tools.netlab.scenarios import LEASE_TTL_S, SCENARIOS, Outcome, run

pytestmark = pytest.mark.timeout(120)
FAILOVER_S = 5.0
"""The contract: the first write acknowledged on the majority side at most this long after
the fault."""
STEADY_GAP_S = 1.0
"""A fault that changes nothing for clients: never this long without an acknowledgement."""


def assert_safe(outcome: Outcome) -> None:
    assert outcome.verdict.ok, outcome.describe()
    assert outcome.converged, f"replicas differ after the heal\n{outcome.describe()}"


def assert_fails_over(outcome: Outcome) -> None:
    """A node of the majority side acknowledges within FAILOVER_S, and the old leader
    no longer answers /primary with 200 by then."""
    first = outcome.first_ack_s
    assert first is not None and first <= FAILOVER_S, (
        f"no write acknowledged on the majority side within {FAILOVER_S:g} s of the fault\n"
        + outcome.describe()
    )
    assert outcome.leader not in outcome.samples[-1].primaries, (
        f"the old leader {outcome.leader} still answers /primary 200\n{outcome.describe()}"
    )


def assert_nothing_changes(outcome: Outcome) -> None:
    """One term, writes acknowledged all along, and /primary on the leader alone; a
    probe that got no answer at all is not counted against it (it says nothing)."""
    assert not outcome.leader_changed, outcome.describe()
    assert outcome.acks > 0 and outcome.max_gap_s < STEADY_GAP_S, outcome.describe()
    leader = outcome.leader
    others = [(round(s.at, 2), s.primaries) for s in outcome.samples if set(s.primaries) - {leader}]
    assert not others, f"another node answered /primary 200: {others}\n{outcome.describe()}"
    refused = [
        round(s.at, 2)
        for s in outcome.samples
        if leader not in s.primaries and leader not in s.unanswered
    ]
    assert not refused, f"the leader's /primary answered 503 at {refused} s\n{outcome.describe()}"


# -- a) and c): the leader loses its followers but keeps etcd --------------------------------


async def test_a_leader_cut_from_its_followers_is_replaced_within_5_s(healed: NetCluster) -> None:
    """Needs check-quorum: a leader that cannot reach a quorum of followers steps down."""
    outcome = await run(healed, SCENARIOS["leader-cut-from-followers"])
    assert_safe(outcome)
    assert_fails_over(outcome)


async def test_c_leader_to_followers_dropped_one_way_is_replaced_within_5_s(
    healed: NetCluster,
) -> None:
    outcome = await run(healed, SCENARIOS["leader-to-followers-dropped"])
    assert_safe(outcome)
    assert_fails_over(outcome)


async def test_c_followers_to_leader_dropped_one_way_is_replaced_within_5_s(
    healed: NetCluster,
) -> None:
    outcome = await run(healed, SCENARIOS["followers-to-leader-dropped"])
    assert_safe(outcome)
    assert_fails_over(outcome)


# -- b): the leader loses etcd but keeps its followers -----------------------------------------


async def test_b_a_leader_cut_from_etcd_acknowledges_nothing_after_its_lease(
    healed: NetCluster,
) -> None:
    outcome = await run(healed, SCENARIOS["leader-cut-from-etcd"])
    assert_safe(outcome)
    assert_fails_over(outcome)
    assert outcome.late_minority_acks == 0, (
        f"the cut-off leader acknowledged writes more than {LEASE_TTL_S:g} s after the cut\n"
        + outcome.describe()
    )
    # Written to it directly, needing one follower, which it still reaches: refused.
    answers = outcome.probes[outcome.leader]
    assert answers and 200 not in answers, answers


# -- d): an isolated follower must not take over when the leader dies ------------------------


async def test_d_an_isolated_follower_never_leads_when_the_leader_dies(healed: NetCluster) -> None:
    """Needs pre-vote: a node that cannot reach its peers does not campaign."""
    outcome = await run(healed, SCENARIOS["isolated-follower-leader-killed"])
    assert_safe(outcome)
    (isolated,) = outcome.plan.never_primary
    seen = [round(s.at, 2) for s in outcome.samples if isolated in s.primaries]
    assert not seen, f"{isolated}, cut from its peers, answered /primary 200 at {seen} s"
    first = outcome.first_ack_s
    assert first is not None and first <= FAILOVER_S, outcome.describe()
    assert outcome.leader_after in outcome.plan.majority, outcome.describe()


# -- e): losing one etcd member changes nothing ------------------------------------------------


async def test_e_a_leader_cut_from_one_etcd_member_goes_on(healed: NetCluster) -> None:
    outcome = await run(healed, SCENARIOS["cut-from-one-etcd-member"])
    assert_safe(outcome)
    assert_nothing_changes(outcome)


async def test_e_an_etcd_member_killed_changes_nothing(healed: NetCluster) -> None:
    """A member that is not etcd's own Raft leader: the other two keep etcd's leader."""
    outcome = await run(healed, SCENARIOS["etcd-follower-member-killed"])
    assert_safe(outcome)
    assert_nothing_changes(outcome)
    assert all(member.running for member in healed.etcd), "the heal starts it again"


async def test_e_etcd_raft_leader_killed_is_no_longer_than_a_failover(healed: NetCluster) -> None:
    outcome = await run(healed, SCENARIOS["etcd-raft-leader-killed"])
    assert_safe(outcome)
    if outcome.leader_changed:
        # etcd's election (a 1 s election timeout by default, and its leader's lease checks
        # after it) can outlast the 1.5 s the lease clock leaves our leader, and then the
        # store fails over too: clients may hear nothing for no longer than a failover takes.
        assert outcome.max_gap_s <= FAILOVER_S, outcome.describe()
    else:
        assert_nothing_changes(outcome)


# -- f): slow links are not partitions ---------------------------------------------------------


async def test_f_slow_leader_links_cause_no_step_down(healed: NetCluster) -> None:
    outcome = await run(healed, SCENARIOS["slow-leader-links"])
    assert_safe(outcome)
    assert_nothing_changes(outcome)
    # Through the proxy, not around it: while the fault held the proxy carried the leader's
    # connections to etcd and to the slow follower.
    proxied = {p for h, p in outcome.connections if h.startswith("proxy>")}
    assert {ETCD_CLIENT_PORT, NODE_PORT} <= proxied, outcome.connections
