"""One HA cycle as a pure decision, after Patroni's `Ha.run_cycle()`. No I/O.

Each cycle reads the cluster from etcd once, decides, acts, and says in one sentence what
it did ("no action: I am n1, the leader with the lease", "following n2 (term 7)"). The
sentence is logged when it changes and shown by `GET /ha` and the live page. Which
follower campaigns first is :func:`campaign_delay`'s answer.
"""

from __future__ import annotations

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
    """The key names this node but not its lease: a previous incarnation's. Revoke it."""
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


def decide(view: ClusterView | None, me: Me, etcd_error: str = "") -> Decision:
    """What to do, given etcd's view (None: etcd did not answer)."""
    if view is None:
        if me.role is Role.LEADER:
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
            if me.lease_valid:
                return Decision(
                    Action.LEAD, f"no action: I am {me.name}, the leader with the lease", leader
                )
            return Decision(
                Action.STEP_DOWN,
                "stepped down: my lease ran out before a keepalive was answered",
                leader,
            )
        return Decision(
            Action.RELEASE,
            f"revoked lease {leader.lease:x}, left by an earlier process of {me.name}",
            leader,
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


def campaign_delay(me: Candidate, peers: list[Candidate], step_s: float) -> tuple[float, str]:
    """How long to wait before campaigning, and why: `step_s` for each peer that could lead
    and is better placed (further applied, then more held, then a higher priority).

    The best candidate campaigns at once; one that is behind gives it time to win first,
    and campaigns anyway if it does not (it may have died since it answered).
    """
    better = sorted(p.name for p in peers if p.priority > 0 and p.rank() > me.rank())
    if not better:
        return 0.0, "no better-placed peer"
    return step_s * len(better), f"{', '.join(better)} {'is' if len(better) == 1 else 'are'} ahead"
