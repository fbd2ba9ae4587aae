"""One HA cycle as a pure decision, after Patroni's `Ha.run_cycle()`. No I/O.

Each cycle reads the cluster from etcd once, decides, acts, and says in one sentence what
it did ("no action: I am n1, the leader with the lease", "following n2 (term 7)"). The
sentence is logged when it changes and shown by `GET /ha` and the live page. Which
follower campaigns first is :func:`campaign_delay`'s answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    LEADER = "leader"
    FOLLOWER = "follower"


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """The leader key's value: who leads, where, in which term, on which lease."""

    name: str
    url: str
    term: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What one read of etcd says: the leader key (None: vacant) and the term counter."""

    leader: LeaderRecord | None
    term: int
    term_revision: int = 0
    """The counter's mod_revision (0: absent), compared in the campaign's transaction."""


class Action(StrEnum):
    LEAD = "lead"
    FOLLOW = "follow"
    CAMPAIGN = "campaign"
    STEP_DOWN = "step_down"
    RELEASE = "release"
    """The key names this node on a lease it held before (recorded in DATA_DIR). Revoke it."""
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    sentence: str
    leader: LeaderRecord | None = None


@dataclass(frozen=True, slots=True)
class Me:
    """What this node is, as the cycle sees it."""

    name: str
    role: Role
    lease: int | None
    """The lease this process holds (granted by it), if any."""
    lease_valid: bool
    priority: int
    cannot_lead: str | None = None
    """Why this leader must step down though it holds the lease: it has not heard from its
    write quorum for CHECK_QUORUM_MS, or its start-up read failed or stalled."""
    earlier_leases: frozenset[int] = frozenset()
    """Leases this node was granted before, by this process or (in DATA_DIR) an earlier one."""


def decide(view: ClusterView | None, me: Me, etcd_error: str = "") -> Decision:
    """What to do, given etcd's view (None: etcd did not answer)."""
    if view is None:
        if me.role is Role.LEADER:
            if me.lease_valid and me.cannot_lead:
                return Decision(Action.STEP_DOWN, f"stepped down: {me.cannot_lead}")
            if me.lease_valid:
                return Decision(
                    Action.LEAD,
                    f"no action: I am {me.name}, the leader; etcd did not answer ({etcd_error}) "
                    "but my lease has not run out",
                )
            return Decision(
                Action.STEP_DOWN,
                f"stepped down: {etcd_error}, and my lease ran out before a keepalive was answered",
            )
        return Decision(Action.WAIT, f"no action: {etcd_error}; no election can take place")
    leader = view.leader
    if leader is not None and leader.name == me.name:
        if me.role is Role.LEADER and me.lease == leader.lease:
            if not me.lease_valid:
                return Decision(
                    Action.STEP_DOWN,
                    "stepped down: my lease ran out before a keepalive was answered",
                    leader,
                )
            if me.cannot_lead:
                return Decision(Action.STEP_DOWN, f"stepped down: {me.cannot_lead}", leader)
            return Decision(
                Action.LEAD, f"no action: I am {me.name}, the leader with the lease", leader
            )
        if leader.lease in me.earlier_leases:
            return Decision(
                Action.RELEASE,
                f"revoked lease {leader.lease:x}, which {me.name} held before",
                leader,
            )
        # Revocation is by lease, never by name: another process may run as this node.
        return Decision(
            Action.WAIT,
            f"no action: the leader key names {me.name} on lease {leader.lease:x}, which this "
            f"node never held (an earlier process without DATA_DIR, or another process named "
            f"{me.name}); waiting for the lease to expire",
        )
    if leader is not None:
        if me.role is Role.LEADER:
            return Decision(
                Action.STEP_DOWN, f"stepped down: {leader.name} leads in term {leader.term}", leader
            )
        return Decision(
            Action.FOLLOW, f"following {leader.name} at {leader.url} (term {leader.term})", leader
        )
    if me.role is Role.LEADER:
        return Decision(Action.STEP_DOWN, "stepped down: the leader key is gone from etcd")
    if me.priority <= 0:
        return Decision(Action.WAIT, "no leader; not campaigning (FAILOVER_PRIORITY=0)")
    return Decision(Action.CAMPAIGN, "no leader: campaigning")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node's claim to lead: how up to date it is, and its FAILOVER_PRIORITY."""

    name: str
    applied_through: int
    last_version: int
    priority: int

    def rank(self) -> tuple[int, int, int]:
        return (self.applied_through, self.last_version, self.priority)


def campaign_delay(
    me: Candidate, peers: list[Candidate], step_s: float, unknown: Sequence[str] = ()
) -> tuple[float, str]:
    """How long to wait before campaigning, and why: `step_s` for each peer that could lead
    and is better placed (further applied, then more held, then a higher priority), and for
    each peer that did not answer (`unknown`: it may be better placed, so it is never taken
    for dead and passed over).

    The best candidate campaigns at once; one that is behind gives it time to win first,
    and campaigns anyway if it does not (it may have died since it answered).
    """
    better = sorted(p.name for p in peers if p.priority > 0 and p.rank() > me.rank())
    reasons = []
    if better:
        reasons.append(f"{', '.join(better)} {'is' if len(better) == 1 else 'are'} ahead")
    if unknown:
        names = ", ".join(sorted(unknown))
        reasons.append(f"{names} did not answer, so {'it' if len(unknown) == 1 else 'they'} may be")
    if not reasons:
        return 0.0, "no better-placed peer"
    return step_s * (len(better) + len(unknown)), "; ".join(reasons)


def pre_vote(reached: Sequence[str], needed: int, peers: int) -> str | None:
    """Raft's pre-vote, for a lease: None if this node may campaign, having just reached
    `needed` of its `peers` (the peers its start-up read must read); otherwise why not.

    A node that cannot reach enough peers would take the lease and then stall in its
    start-up read, and no one could lead until the lease ran out; it leaves the election
    to a node that can."""
    if len(reached) >= needed:
        return None
    return (
        f"not campaigning: reached {len(reached)} of {peers} peers, and a start-up read needs "
        f"{needed}"
    )
