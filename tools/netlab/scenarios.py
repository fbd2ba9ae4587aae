"""Partition scenarios: a fault under a write load, then heal and check what clients were told.

One run of a scenario (:func:`run`): settle the cluster (links whole, one primary that
reaches every follower), start the writers, apply the fault, watch for a window (who is
primary, which node acknowledges what), heal, let the writers see the healed cluster, stop
them, wait for every replica to hold the same data, and check the acknowledgements
(tools/writers.py's `check`: none lost, no version twice, one node per term, terms never
overlapping). tests/partition asserts on the :class:`Outcome`; benchmarks/partitions.py
times many.

Every blocking call on the cluster (nft, signals, polling) runs in a thread: the event loop
carries the writers, and an answer read late would look like two leaders at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tools.netlab.cluster import ETCD_CLIENT_PORT, NODE_PORT, NetCluster
from tools.netlab.load import Load
from tools.writers import Verdict, check

LEASE_TTL_S = 2.0
"""The nodes' LEASE_TTL_S (the default): a leader cut from etcd acknowledges nothing after."""
SLOW_FOLLOWER_MS = 200
SLOW_ETCD_MS = 150
_runs = itertools.count()


@dataclass
class Plan:
    """What a fault did: when it took effect, and which nodes are on the majority side."""

    at: float
    majority: list[str]
    never_primary: list[str] = field(default_factory=list)
    """Nodes that must not answer /primary with 200 while the fault holds."""


@dataclass(frozen=True)
class Sample:
    at: float
    """Seconds after the fault."""
    primaries: list[str]
    """The nodes that answered /primary with 200."""
    unanswered: dict[str, str]
    """Nodes whose probe got no answer at all (an error, not a 503): node -> error."""


@dataclass(frozen=True)
class Scenario:
    name: str
    apply: Callable[[NetCluster, str, Load], Awaitable[Plan]]
    leader_changes: bool
    """True: the leader must lose its place; False: nothing may change for clients."""
    hold_s: float = 4.0
    """How long a fault that changes nothing is held."""


@dataclass
class Outcome:
    scenario: str
    leader: str
    plan: Plan
    first_ack_s: float | None
    """From the fault to the first write acknowledged by a node of the majority side."""
    max_gap_s: float
    """The longest time during the fault in which no write was acknowledged."""
    samples: list[Sample]
    """Who answered /primary 200, every ~100 ms while the fault held."""
    status_at_end: dict[str, dict[str, Any]]
    """Each node's GET /ha as the fault ended: its sentence says what it thought."""
    late_minority_acks: int
    """Writes acknowledged by a node off the majority side, read later than one lease
    after the fault."""
    terms: list[int]
    verdict: Verdict
    converged: bool
    leader_after: str
    acks: int
    """Writes acknowledged while the fault held."""
    probes: dict[str, list[int | str]]
    """For each running node off the majority side: the answers to writes sent to it
    directly (w=1) as the fault ended. No 200 may be among them."""
    connections: list[tuple[str, int]]
    """The old leader's TCP connections as the fault ended, (host, port), and the delay
    proxy's (the leader's own sockets name the address they asked for, before DNAT)."""

    @property
    def leader_changed(self) -> bool:
        return len(self.terms) > 1

    @property
    def two_leaders(self) -> int:
        return len(self.verdict.overlapping)

    def describe(self) -> str:
        """A failure message: the numbers, and what each node said it was doing."""
        lines = [
            f"{self.scenario}: leader {self.leader} -> {self.leader_after}; first majority "
            f"ack {self.first_ack_s}; max gap {self.max_gap_s:.2f} s; terms {self.terms}; "
            f"{self.verdict}; converged {self.converged}",
        ]
        lines += [
            f"  /primary probe unanswered {s.at:.2f} s after the fault: {s.unanswered}"
            for s in self.samples
            if s.unanswered
        ][:5]
        for name, status in self.status_at_end.items():
            lines.append(f"  {name}: {status.get('last_action', status)}")
        return "\n".join(lines)


# -- the faults -------------------------------------------------------------------------------


def _others(cluster: NetCluster, leader: str) -> list[str]:
    return [name for name in cluster.names if name != leader]


async def _each(action: Callable[[str, str], None], pairs: list[tuple[str, str]]) -> float:
    def apply() -> None:
        for a, b in pairs:
            action(a, b)

    await asyncio.to_thread(apply)
    return time.monotonic()


async def leader_cut_from_followers(cluster: NetCluster, leader: str, load: Load) -> Plan:
    followers = _others(cluster, leader)
    at = await _each(cluster.cut, [(leader, f) for f in followers])
    return Plan(at, followers)


async def leader_cut_from_etcd(cluster: NetCluster, leader: str, load: Load) -> Plan:
    at = await _each(cluster.cut, [(leader, m.name) for m in cluster.etcd])
    return Plan(at, _others(cluster, leader))


async def leader_to_followers_dropped(cluster: NetCluster, leader: str, load: Load) -> Plan:
    followers = _others(cluster, leader)
    at = await _each(cluster.cut_one_way, [(leader, f) for f in followers])
    return Plan(at, followers)


async def followers_to_leader_dropped(cluster: NetCluster, leader: str, load: Load) -> Plan:
    followers = _others(cluster, leader)
    at = await _each(cluster.cut_one_way, [(f, leader) for f in followers])
    return Plan(at, followers)


async def isolated_follower_then_leader_killed(
    cluster: NetCluster, leader: str, load: Load
) -> Plan:
    """A follower cut from its peers (it keeps etcd) falls behind; then the leader dies."""
    isolated = _others(cluster, leader)[0]
    etcd = [m.name for m in cluster.etcd]
    await asyncio.to_thread(cluster.isolate, isolated, etcd)
    if await load.wait_acks(time.monotonic(), 20, 10) is None:
        raise RuntimeError("no writes acknowledged with one follower isolated")
    await asyncio.to_thread(cluster.kill, leader)
    majority = [n for n in cluster.names if n not in (leader, isolated)]
    return Plan(time.monotonic(), majority, never_primary=[isolated])


async def cut_from_one_etcd_member(cluster: NetCluster, leader: str, load: Load) -> Plan:
    """The leader loses the etcd member it talks to now; two others still answer."""
    in_use = await asyncio.to_thread(cluster.etcd_in_use, leader)
    member = in_use[0] if in_use else cluster.etcd[0].name
    at = await _each(cluster.cut, [(leader, member)])
    return Plan(at, list(cluster.names))


async def etcd_follower_member_killed(cluster: NetCluster, leader: str, load: Load) -> Plan:
    """SIGKILL an etcd member that is not etcd's Raft leader, the one the HA leader talks
    to if it is one: the other two keep etcd's quorum and its leader."""
    raft_leader = await asyncio.to_thread(cluster.etcd_raft_leader)
    in_use = await asyncio.to_thread(cluster.etcd_in_use, leader)
    others = [m.name for m in cluster.etcd if m.name != raft_leader]
    victim = next((m for m in in_use if m != raft_leader), others[0])
    await asyncio.to_thread(cluster.kill_etcd_member, victim)
    return Plan(time.monotonic(), list(cluster.names))


async def etcd_raft_leader_killed(cluster: NetCluster, leader: str, load: Load) -> Plan:
    """SIGKILL etcd's Raft leader: etcd elects another (its election timeout is 1 s)
    while the HA leader's keepalives wait."""
    raft_leader = await asyncio.to_thread(cluster.etcd_raft_leader)
    await asyncio.to_thread(cluster.kill_etcd_member, raft_leader or 0)
    return Plan(time.monotonic(), list(cluster.names))


async def slow_leader_links(cluster: NetCluster, leader: str, load: Load) -> Plan:
    """SLOW_FOLLOWER_MS each way to one follower, SLOW_ETCD_MS each way to every etcd
    member (all of them: a reset connection would otherwise move to a fast one)."""

    def apply() -> None:
        cluster.slow(leader, [(_others(cluster, leader)[0], NODE_PORT)], SLOW_FOLLOWER_MS)
        cluster.slow(leader, [(m.name, ETCD_CLIENT_PORT) for m in cluster.etcd], SLOW_ETCD_MS)

    await asyncio.to_thread(apply)
    return Plan(time.monotonic(), list(cluster.names))


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("leader-cut-from-followers", leader_cut_from_followers, True),
        Scenario("leader-cut-from-etcd", leader_cut_from_etcd, True),
        Scenario("leader-to-followers-dropped", leader_to_followers_dropped, True),
        Scenario("followers-to-leader-dropped", followers_to_leader_dropped, True),
        Scenario("isolated-follower-leader-killed", isolated_follower_then_leader_killed, True),
        Scenario("cut-from-one-etcd-member", cut_from_one_etcd_member, False),
        Scenario("etcd-follower-member-killed", etcd_follower_member_killed, False),
        Scenario("etcd-raft-leader-killed", etcd_raft_leader_killed, False),
        Scenario("slow-leader-links", slow_leader_links, False),
    ]
}


# -- one run ------------------------------------------------------------------------------


async def primaries_now(
    client: httpx.AsyncClient, urls: dict[str, str], errors: dict[str, str] | None = None
) -> list[str]:
    """The nodes answering /primary with 200; a node that does not answer at all is
    added to `errors` (a refusal is an answer; a probe that failed is not)."""

    async def one(name: str, url: str) -> str | None:
        try:
            return name if (await client.get(f"{url}/primary")).status_code == 200 else None
        except httpx.HTTPError as exc:
            if errors is not None:
                errors[name] = repr(exc)
            return None

    found = await asyncio.gather(*(one(n, u) for n, u in urls.items()))
    return [name for name in found if name is not None]


async def settle(cluster: NetCluster, client: httpx.AsyncClient, timeout: float = 40.0) -> str:
    """Heal, then wait until one primary acknowledges a write at every follower; its name."""
    deadline = time.monotonic() + timeout
    leader = await asyncio.to_thread(cluster.heal, timeout)
    everyone = len(cluster.members) - 1
    for n in itertools.count():
        try:
            answer = await client.post(
                f"{cluster.url_of(leader)}/keys",
                params={"w": str(everyone), "timeout_ms": "1000"},
                json={"key": f"settle-{next(_runs)}", "value": n},
            )
            if answer.status_code == 200:
                return leader
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            said = await _statuses(client, cluster)
            raise TimeoutError(
                f"{leader} did not reach every follower within {timeout:g} s: "
                + "; ".join(f"{n}: {s.get('last_action')}" for n, s in said.items())
            )
        await asyncio.sleep(0.1)
        found = await primaries_now(client, cluster.node_urls())
        leader = found[0] if len(found) == 1 else leader
    raise AssertionError("unreachable")


async def converged(client: httpx.AsyncClient, urls: list[str], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = [(await client.get(f"{url}/state")).json() for url in urls]
            first = (states[0]["store"], states[0]["versions"])
            if all((s["store"], s["versions"]) == first for s in states[1:]):
                return True
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)


async def run(
    cluster: NetCluster,
    scenario: Scenario,
    *,
    window_s: float = 5.0,
    writers: int = 3,
    rate: float | None = 150.0,
) -> Outcome:
    """One run of `scenario` on `cluster`, which is healed again when it returns."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        leader = await settle(cluster, client)
        load = Load(cluster.urls, f"{scenario.name}-{next(_runs)}-", writers, rate=rate)
        try:
            if await load.wait_acks(time.monotonic(), 20, 10) is None:
                raise RuntimeError(f"{scenario.name}: no writes acknowledged before the fault")
            plan = await scenario.apply(cluster, leader, load)
            majority = [cluster.url_of(n) for n in plan.majority]
            samples: list[Sample] = []
            first: float | None = None
            end = plan.at + (window_s if scenario.leader_changes else scenario.hold_s)
            while time.monotonic() < end:
                errors: dict[str, str] = {}
                found = await primaries_now(client, cluster.node_urls(), errors)
                samples.append(Sample(time.monotonic() - plan.at, found, errors))
                if first is None:
                    first = _first(load, plan.at, majority)
                    if first is not None and scenario.leader_changes:
                        # Hold on a little: the old side must stay quiet past its lease.
                        end = max(plan.at + first + 1.0, plan.at + LEASE_TTL_S + 0.5)
                await asyncio.sleep(0.1)
            first = first if first is not None else _first(load, plan.at, majority, window_s)
            fault_end = time.monotonic()
            status = await _statuses(client, cluster)
            probes = await _probe(client, cluster, plan)
            connections = await asyncio.to_thread(_connections, cluster, leader)
            leader_after = next((s.primaries[0] for s in samples[-1:] if len(s.primaries) == 1), "")
            healed = await settle(cluster, client)
            await load.wait_acks(time.monotonic(), 10, 10)
        except BaseException:
            await asyncio.to_thread(cluster.network.heal)
            raise
        finally:
            await load.finish()
        late = [
            a
            for a in load.acks(plan.at + LEASE_TTL_S)
            if a.node not in majority and a.at < fault_end
        ]
        urls = cluster.urls
        same = await converged(client, urls)
        versions = (await client.get(f"{cluster.url_of(healed)}/state")).json()["versions"]
        during = [a for a in load.acks(plan.at) if a.at < fault_end]
        return Outcome(
            scenario=scenario.name,
            leader=leader,
            plan=plan,
            first_ack_s=first,
            max_gap_s=load.max_gap(plan.at, fault_end),
            samples=samples,
            status_at_end=status,
            late_minority_acks=len(late),
            terms=sorted({a.term for a in load.acks(plan.at - 1.0) if a.at < fault_end}),
            verdict=check(load.log, versions),
            converged=same,
            leader_after=leader_after,
            acks=len(during),
            probes=probes,
            connections=connections,
        )


def _first(load: Load, at: float, majority: list[str], within: float | None = None) -> float | None:
    acks = load.acks(at, majority)
    moments = [a.at - at for a in acks if within is None or a.at - at <= within]
    return min(moments) if moments else None


def _connections(cluster: NetCluster, leader: str) -> list[tuple[str, int]]:
    found = cluster.network.connections(leader) if cluster.member(leader).running else []
    if "proxy" in cluster.network.hosts:
        found += [("proxy>" + h, p) for h, p in cluster.network.connections("proxy")]
    return found


async def _probe(
    client: httpx.AsyncClient, cluster: NetCluster, plan: Plan
) -> dict[str, list[int | str]]:
    answers: dict[str, list[int | str]] = {}
    for name, url in cluster.node_urls().items():
        if name in plan.majority:
            continue
        answers[name] = []
        for i in range(5):
            try:
                answer = await client.post(
                    f"{url}/keys",
                    params={"w": "1", "timeout_ms": "500"},
                    json={"key": f"probe-{name}-{next(_runs)}", "value": i},
                )
                answers[name].append(answer.status_code)
            except httpx.HTTPError as exc:
                answers[name].append(type(exc).__name__)
    return answers


async def _statuses(client: httpx.AsyncClient, cluster: NetCluster) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name, url in cluster.node_urls().items():
        try:
            found[name] = (await client.get(f"{url}/ha")).json()
        except (httpx.HTTPError, ValueError) as exc:
            found[name] = {"last_action": f"no answer: {exc!r}"}
    return found
