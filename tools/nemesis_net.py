"""The nemesis's `--net` mode: HA nodes in the partition lab, partitions among the faults.

Five HA nodes (WRITE_QUORUM 2, delays 0..20 ms, a DATA_DIR each) and a three-member etcd,
every one in a network namespace of its own (tools/netlab). One fault at a time, drawn
from the seed, each held for a while and healed before the next:

* a node (the leader half the time) cut from some of its peers, both ways or one way in
  either direction; isolated from every host (or from every node but keeping etcd); cut
  from every etcd member, or from one;
* a node wiped: SIGKILL, its DATA_DIR deleted, restarted (memory loss);
* an etcd member killed and started again;
* a node SIGKILLed and restarted, or frozen with SIGSTOP for up to 3.5 s.

Clients (tools/nemesis_clients.py) write, conditionally write and delete, retrying with
one Idempotency-Key, and read. The history goes to `history.jsonl` in the run's folder
(`ours` format) and is checked per key for linearizability (tools/linearizability.py's
versioned model, with rewrites: a promoted node restamps keys it merged, as documented in
kv/core/startup.py), and the store's own invariants are checked too (:func:`invariants`).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kv.core.records import term_of
from tools.cluster import ROOT
from tools.history import HistoryRecorder, operations, to_edn
from tools.linearizability import CheckResult, Verdict, check_operations, versioned_model
from tools.nemesis import quiesce_urls
from tools.nemesis_clients import Client, Observations
from tools.netlab.cluster import NetCluster

NET_NODES = 5
NET_QUORUM = 2
NET_KEYS = [f"key-{i}" for i in range(16)]
NET_FAULTS = [
    "cut-nodes", "cut-one-way", "isolate-node", "cut-from-etcd", "cut-from-etcd-member",
    "wipe-node", "kill-etcd-member", "kill-node", "pause-node",
]  # fmt: skip


@dataclass
class NetFault:
    kind: str
    detail: str
    at: float
    """Seconds after the faults began."""
    held: float = 0.0


@dataclass
class NetRun:
    """Everything a `--net` run leaves for the checks and the summary."""

    out: Path
    recorder: HistoryRecorder
    seen: Observations
    faults: list[NetFault] = field(default_factory=list)
    wipes: dict[str, list[float]] = field(default_factory=dict)
    """Node URL -> when it was wiped (time.monotonic)."""
    final: dict[str, Any] = field(default_factory=dict)
    leader_at_end: str = ""
    prefix: str = ""
    """The lab's name prefix: no namespace or link with it may be left after the run."""


def inject_net(cluster: NetCluster, rng: random.Random, run: NetRun, started: float) -> None:
    """One fault drawn from `rng`, held, then healed, all before it returns."""
    kind = rng.choice(NET_FAULTS)
    primaries = cluster.primaries()
    leader = primaries[0] if len(primaries) == 1 else None
    names = cluster.names
    target = leader if leader and rng.random() < 0.5 else rng.choice(names)
    others = [n for n in names if n != target]
    etcd = [m.name for m in cluster.etcd]
    hold = rng.uniform(0.5, 4.5)
    fault = NetFault(kind, target + (" (leader)" if target == leader else ""),
                     time.monotonic() - started)  # fmt: skip
    run.faults.append(fault)
    if kind in ("cut-nodes", "cut-one-way"):
        peers = rng.sample(others, rng.randint(1, len(others)))
        outward = rng.random() < 0.5
        for peer in peers:
            if kind == "cut-nodes":
                cluster.cut(target, peer)
            elif outward:
                cluster.cut_one_way(target, peer)
            else:
                cluster.cut_one_way(peer, target)
        arrow = "<->" if kind == "cut-nodes" else "->" if outward else "<-"
        fault.detail += f" {arrow} {','.join(sorted(peers))}"
    elif kind == "isolate-node":
        keep = etcd if rng.random() < 0.5 else []
        cluster.isolate(target, keep)
        fault.detail += " keeping etcd" if keep else " from everyone"
    elif kind == "cut-from-etcd":
        for member in etcd:
            cluster.cut(target, member)
    elif kind == "cut-from-etcd-member":
        member = rng.choice(etcd)
        cluster.cut(target, member)
        fault.detail += f" <-> {member}"
    elif kind == "kill-etcd-member":
        member = rng.choice(etcd)
        fault.detail = member
        cluster.kill_etcd_member(member)
    elif kind in ("kill-node", "wipe-node"):
        cluster.kill(target)
        if kind == "wipe-node":
            shutil.rmtree(cluster.member(target).env["DATA_DIR"], ignore_errors=True)
            run.wipes.setdefault(cluster.url_of(target), []).append(time.monotonic())
    else:
        cluster.pause(target)
        hold = min(hold, 3.5)
    time.sleep(hold)
    fault.held = hold
    if kind == "kill-etcd-member":
        cluster.start_etcd_member(fault.detail, timeout=60)
    elif kind in ("kill-node", "wipe-node"):
        cluster.restart(target, timeout=60)
    elif kind == "pause-node":
        cluster.resume(target)
    else:
        cluster.network.heal()


async def run_net(
    seconds: float, seed: int, out: Path, clients: int = 4, root: Path | None = None
) -> NetRun:
    """Faults for `seconds` under `clients` clients, then heal, quiesce and read the state."""
    from tools.netlab.system import preflight

    preflight()
    rng = random.Random(seed)
    run = NetRun(out, HistoryRecorder(), Observations())
    cluster = NetCluster(out / "cluster", nodes=NET_NODES, etcd_members=3, quorum=NET_QUORUM,
                         extra_env={"LOG_LEVEL": "WARNING"}, root=root or ROOT)  # fmt: skip
    run.prefix = cluster.network.prefix
    with cluster:
        limits = httpx.Limits(max_connections=8)
        timeout = httpx.Timeout(2.0 + 1.5, connect=1.0)
        async with httpx.AsyncClient(
            timeout=timeout, trust_env=False, follow_redirects=True, limits=limits
        ) as http:
            await faults_and_clients(cluster, http, rng, run, seconds, clients)
            leader = await asyncio.to_thread(heal_net, cluster)
            run.leader_at_end = leader
            first = cluster.url_of(leader)
            run.final = await quiesce_urls(http, [first, *(u for u in cluster.urls if u != first)])
    return run


async def faults_and_clients(
    cluster: NetCluster,
    http: httpx.AsyncClient,
    rng: random.Random,
    run: NetRun,
    seconds: float,
    clients: int,
) -> None:
    started = time.monotonic()
    until = started + seconds
    client_rngs = [random.Random(rng.random()) for _ in range(clients)]
    tasks = [
        asyncio.create_task(
            Client(http, cluster.urls, i, r, run.recorder, run.seen, NET_KEYS).run(until)
        )
        for i, r in enumerate(client_rngs)
    ]
    fault_rng = random.Random(rng.random())
    try:
        while time.monotonic() < until - 5:
            await asyncio.sleep(fault_rng.uniform(0.5, 2.0))
            if time.monotonic() < until - 5:
                await asyncio.to_thread(inject_net, cluster, fault_rng, run, started)
    finally:
        await asyncio.to_thread(cluster.network.heal)
        await asyncio.gather(*tasks)


def heal_net(cluster: NetCluster) -> str:
    """Every link whole, every member and node running and thawed; the leader's name."""
    for node in cluster.members:
        if node.running:
            node.signal_group(signal.SIGCONT)
    return cluster.heal(60)


# -- the checks ----------------------------------------------------------------------------


def linearizable(run: NetRun, timeout: float = 120.0) -> CheckResult:
    """The history, key by key, against the versioned model (rewrites allowed)."""
    ops = operations(run.recorder.history())
    return check_operations(versioned_model(rewrites=True), ops, timeout)


def invariants(run: NetRun) -> tuple[list[str], int]:
    """The store's own promises over what the clients saw; (anomalies, acks checked).

    * no version given to two different writes (nor read with another write's value);
    * every write acknowledged (200, w >= 2) is held by the leader at the end, at its
      version or a newer one, or was deleted by a later delete, unless every follower that
      confirmed it was wiped since; the same for acknowledged deletes;
    * every replica equals the leader after quiescence; no 5xx but 503;
    * no Idempotency-Key applied twice: a write sent again with its key after its 200 gets
      that version back, never a new one, nor a 412 (docs/concepts/consistency.md);
    * never two nodes acknowledging writes in one term (a version's term is its high digits):
      a replay is left out, since the leader elected after a failover answers a retry with
      the version the first attempt got from the old leader (docs/concepts/consistency.md).
    """
    seen = run.seen
    anomalies = list(seen.server_errors)
    given: dict[int, tuple[str, Any, bool]] = {}
    for answer in seen.answers:
        if answer.op is None:
            continue
        write = (answer.key, answer.value, answer.deleted)
        first = given.setdefault(answer.version, write)
        if first != write:
            anomalies.append(f"version {answer.version} given to {first} and to {write}")
    for answer in seen.answers:
        if answer.op is None and answer.version in given:
            write = given[answer.version]
            if write[:2] != (answer.key, answer.value):
                anomalies.append(f"read {answer.key}@{answer.version} = {answer.value!r} "
                                 f"from {answer.node}, but that version was {write}")  # fmt: skip
    for op, version, status, got in seen.replays:
        if got is not None and got != version:
            anomalies.append(f"op {op}: its Idempotency-Key was applied again as version "
                             f"{got} (HTTP {status}) after version {version}")  # fmt: skip
        elif status == 412:
            anomalies.append(f"op {op}: a repeat with its Idempotency-Key got 412 after "
                             f"version {version}, not the write it made")  # fmt: skip
    by_term: dict[int, set[str]] = defaultdict(set)
    for ack in seen.acks:
        if not ack.replayed:  # a replay confirms a version an earlier attempt was given
            by_term[term_of(ack.version)].add(ack.node)
    for term, nodes in sorted(by_term.items()):
        if len(nodes) > 1:
            anomalies.append(f"term {term} acknowledged by {len(nodes)} nodes: {sorted(nodes)}")
    final = run.final
    if not final.get("converged"):
        anomalies.append(f"replicas differ after {final.get('seconds', 0):.0f} s of quiescence")
    checked = 0
    if final.get("states"):
        lost, checked = _lost(run)
        anomalies += lost
    return anomalies, checked


def _lost(run: NetRun) -> tuple[list[str], int]:
    """Acknowledged writes and deletes the final leader no longer holds."""
    state = run.final["states"][0]
    versions, store = state["versions"], state["store"]
    events = run.recorder.history().events
    invoked = {e.op: e.time for e in events if e.type == "invoke"}
    deletes = _deletes(run)
    anomalies, checked = [], 0
    for ack in run.seen.acks:
        assert ack.op is not None
        started = invoked[ack.op]
        kept = [n for n in ack.holders if not any(t > started for t in run.wipes.get(n, []))]
        if not kept:
            continue
        checked += 1
        held = versions.get(ack.key)
        if not ack.deleted and (held is None or held < ack.version):
            later = any(
                (ended > started) if version is None else version > ack.version
                for _, version, ended in deletes.get(ack.key, [])
            )
            if not (held is None and later):
                anomalies.append(f"acknowledged write lost: {ack.key}@{ack.version} "
                                 f"(holds {held})")  # fmt: skip
        if ack.deleted and ack.key in store and versions[ack.key] < ack.version:
            anomalies.append(f"deleted key returned: {ack.key} (deleted at {ack.version})")
    return anomalies, checked


def _deletes(run: NetRun) -> dict[str, list[tuple[int, int | None, float]]]:
    """Per key, each delete that may have taken effect: (op, version or None, its end)."""
    found: dict[str, list[tuple[int, int | None, float]]] = defaultdict(list)
    events = run.recorder.history().events
    ends = {e.op: e for e in events if e.type != "invoke"}
    for event in events:
        if event.type != "invoke" or event.f != "delete" or event.op is None:
            continue
        end = ends.get(event.op)
        if end is None or end.type == "info":
            found[event.key or ""].append((event.op, None, end.time if end else float("inf")))
        elif end.type == "ok" and "version" in end.extra:
            found[event.key or ""].append((event.op, end.extra["version"], end.time))
    return found


def write_history(run: NetRun, export_edn: bool) -> Path:
    """history.jsonl (and history.edn) in the run's folder; the path of the JSON lines."""
    path = run.out / "history.jsonl"
    run.recorder.write_jsonl(path)
    if export_edn:
        (run.out / "history.edn").write_text(to_edn(run.recorder.history()), encoding="utf-8")
    return path


def net_summary(run: NetRun, result: CheckResult, anomalies: list[str], checked: int,
                seed: int, seconds: float) -> str:  # fmt: skip
    events = run.recorder.history().events
    outcomes: dict[str, int] = defaultdict(int)
    for event in events:
        if event.type != "invoke":
            outcomes[f"{event.f} {event.type}"] += 1
    faults: dict[str, int] = defaultdict(int)
    for fault in run.faults:
        faults[fault.kind] += 1
    undecided = [p for p in result.partitions if p.verdict is Verdict.UNKNOWN]
    lines = [
        f"nemesis --net: seed {seed}, {seconds:g} s, {NET_NODES} HA nodes in namespaces, "
        f"3 etcd members, WRITE_QUORUM {NET_QUORUM}",
        "",
        f"{'operations':<30}{sum(outcomes.values()):>8}",
        *(f"  {name:<28}{count:>8}" for name, count in sorted(outcomes.items())),
        f"{'requests (with retries)':<30}{run.seen.attempts:>8}",
        f"{'reads (not in the history)':<30}{sum(1 for a in run.seen.answers if a.op is None):>8}",
        f"{'replays with the same key':<30}{len(run.seen.replays):>8}",
        f"{'faults injected':<30}{len(run.faults):>8}",
        *(f"  {name:<28}{count:>8}" for name, count in sorted(faults.items())),
        f"{'acknowledged writes checked':<30}{checked:>8}",
        f"{'converged after healing':<30}{run.final.get('seconds', 0):>7.2f}s",
        f"{'linearizability':<30}{result.verdict.value:>16} ({result.keys} keys, "
        f"{result.seconds:.1f} s)" + (f", {len(undecided)} undecided" if undecided else ""),
        f"{'anomalies':<30}{len(anomalies):>8}",
        *(f"  {anomaly}" for anomaly in anomalies[:20]),
    ]
    for failure in result.failures[:1]:
        lines += ["", failure.report()]
    lines += ["", "faults:", *(f"  {f.at:6.1f} s  {f.kind:<22} {f.detail} ({f.held:.1f} s)"
                               for f in run.faults)]  # fmt: skip
    return "\n".join(lines)
