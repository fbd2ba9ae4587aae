"""A nemesis: random faults against a real local cluster under writes, then a history check.

    python tools/nemesis.py                          # 60 s, a random seed (printed)
    python tools/nemesis.py --seconds 600 --seed 7   # a long run, replaying seed 7's schedule
    python tools/nemesis.py --ha                     # HA nodes: the leader and etcd faulted too
    python tools/nemesis.py --net --export-edn       # HA nodes in namespaces: partitions too

It starts a leader and three followers (WRITE_QUORUM 2, so STARTUP_QUORUM 2,
delays 0..40 ms, every node with a DATA_DIR) on free loopback ports. Clients
write and delete a small set of keys at w = 0..3 while the nemesis, on a
schedule drawn from the seed, SIGKILLs and restarts the leader and followers
(some restarts with their DATA_DIR deleted: memory loss), and freezes followers
with SIGSTOP for a while. Every operation is recorded with its outcome. At the
end every node is healed, and the checker goes over the whole history:

* no version was ever given to two different writes;
* every write acknowledged (200) at w >= 1 is on the leader (that version or a
  newer one, or deleted by a later delete, answered or not: a request the leader
  died before answering may have taken effect) if a follower that confirmed it
  kept its memory afterwards; a deletion likewise stays deleted unless written again;
* every replica's /state equals the leader's after quiescence;
* no request got a 5xx other than the documented 503.

With `--ha` it starts a private etcd and four HA nodes (`python -m kv.ha`, WRITE_QUORUM 2,
the same delays and DATA_DIRs), the clients write to any node and follow its redirect to
the leader, and the faults are: SIGKILL or SIGSTOP of the leader's process group (a pause
of up to 3.5 s, past its lease), SIGKILL or SIGSTOP of etcd, and the same of a follower.
The checker is the same, with the node that leads at the end in the leader's place.

With `--net` (tools/nemesis_net.py; root, iproute2, nftables) five HA nodes and a
three-member etcd run in the partition lab (tools/netlab), each in a network namespace of
its own, and the faults are partitions (a node cut from some peers both ways or one way in
either direction, isolated, cut from etcd or from one member), node wipes (SIGKILL, DATA_DIR
deleted, restart), etcd member kills, and SIGKILL or SIGSTOP of a node, one at a time, each
healed before the next. Its clients (tools/nemesis_clients.py) retry a write with the same
Idempotency-Key, follow redirects, move to another node on errors, write conditionally
(`?if_version=`) and read; every operation is recorded with tools/history.py's
HistoryRecorder. The history is written to the run's folder (`--out`, default
results/nemesis/net-SEED-TIME) as `history.jsonl` (`ours`; `--export-edn`: history.edn too),
checked per key for linearizability, and checked for the store's invariants: those above,
no Idempotency-Key applied twice, and never two nodes acknowledging in one term. Reads stay
out of the linearizability check (the store promises none for reads; see
tools/nemesis_clients.py). Exits 1 on a violation (the smallest failing window printed) or
an anomaly, 2 if the search is undecided.

The schedule of faults and operations comes from the seed; timing on a shared
machine does not, so two runs of one seed inject the same faults in the same
order, not at the same instants. Prints a summary table; exits 1 on any anomaly.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import HACluster, LocalCluster

FOLLOWERS = 3
WRITE_QUORUM = 2
KEYS = [f"key-{i}" for i in range(12)]


@dataclass
class Operation:
    kind: str  # "write" or "delete"
    key: str
    value: object
    w: int
    started: float
    finished: float = 0.0
    status: int | None = None  # None: no answer (the leader was down)
    version: int | None = None
    confirmers: list[str] = field(default_factory=list)


@dataclass
class Fault:
    kind: str
    target: str
    at: float


@dataclass
class History:
    operations: list[Operation] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    wipes: dict[str, list[float]] = field(default_factory=dict)  # node url -> times wiped


async def client_loop(
    client: httpx.AsyncClient,
    targets: list[str],
    rng: random.Random,
    history: History,
    until: float,
    prefix: str = "",
) -> None:
    """Write and delete at random. The first target is tried first; on no answer, the next
    (HA: any node, whose redirect leads to the leader)."""
    counter = 0
    turn = 0
    while time.monotonic() < until:
        leader = targets[turn % len(targets)]
        counter += 1
        key = rng.choice(KEYS)
        w = rng.choice([0, 1, 2, 2, 3])
        delete = rng.random() < 0.2
        value = None if delete else f"{prefix}{counter}" if prefix else counter
        op = Operation("delete" if delete else "write", key, value, w, time.monotonic())
        history.operations.append(op)
        try:
            if delete:
                response = await client.delete(
                    f"{leader}/keys/{quote(key, safe='')}?w={w}&timeout_ms=1000"
                )
            else:
                response = await client.post(
                    f"{leader}/keys?w={w}&timeout_ms=1000", json={"key": key, "value": value}
                )
        except httpx.HTTPError:
            op.finished = time.monotonic()
            turn += 1
            await asyncio.sleep(0.05)  # the leader is down or restarting
            continue
        op.finished = time.monotonic()
        op.status = response.status_code
        if response.status_code in (200, 503) and response.headers.get(
            "content-type", ""
        ).startswith("application/json"):
            body = response.json()
            op.version = body.get("version")
            op.confirmers = [d["follower"] for d in body.get("replication", []) if d.get("ok")]


def inject(cluster: LocalCluster, rng: random.Random, history: History, started: float) -> None:
    """One fault, drawn from `rng`, run to completion (restarts wait for readiness)."""
    kind = rng.choice(
        ["kill-leader", "wipe-leader", "kill-follower", "wipe-follower", "freeze-follower"]
    )
    index = rng.randrange(FOLLOWERS)
    follower = cluster.follower_urls[index]
    now = time.monotonic() - started
    if kind in ("kill-leader", "wipe-leader"):
        history.faults.append(Fault(kind, "leader", now))
        cluster.kill_leader()
        time.sleep(rng.uniform(0.1, 1.0))
        if kind == "wipe-leader":
            history.wipes.setdefault(cluster.leader_url, []).append(time.monotonic())
        cluster.restart_leader(fresh=kind == "wipe-leader", timeout=60)
    elif kind in ("kill-follower", "wipe-follower"):
        history.faults.append(Fault(kind, follower, now))
        cluster.kill_follower(index)
        time.sleep(rng.uniform(0.1, 1.5))
        if kind == "wipe-follower":
            history.wipes.setdefault(follower, []).append(time.monotonic())
        cluster.restart_follower(index, fresh=kind == "wipe-follower")
    else:
        history.faults.append(Fault(kind, follower, now))
        cluster.pause_follower(index)
        time.sleep(rng.uniform(0.2, 2.5))
        cluster.resume_follower(index)


async def run(seconds: float, seed: int, workdir: Path, clients: int = 4) -> tuple[History, dict]:
    rng = random.Random(seed)
    history = History()
    cluster = LocalCluster(
        followers=FOLLOWERS,
        quorum=WRITE_QUORUM,
        min_delay_ms=0,
        max_delay_ms=40,
        base_port=0,
        log_dir=workdir / "logs",
        data_dir=workdir / "data",
        extra_env={"LOG_LEVEL": "WARNING"},
    )
    with cluster:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            await faults_under_load(
                client, lambda _: [cluster.leader_url], partial(inject, cluster),
                rng, history, seconds, clients,
            )  # fmt: skip
            await asyncio.to_thread(heal, cluster)
            final = await quiesce(client, cluster)
    return history, final


async def faults_under_load(
    client: httpx.AsyncClient,
    targets: Callable[[int], list[str]],
    inject: Callable[[random.Random, History, float], None],
    rng: random.Random,
    history: History,
    seconds: float,
    clients: int,
    prefixed: bool = False,
) -> None:
    """`clients` client loops (the i-th writing to `targets(i)`) for `seconds`, while
    `inject` runs one fault after another, every 0.5-2 s; returns when the clients stop.
    `prefixed`: each client's values carry its own prefix, so that two writes with one
    value cannot be told apart from one write answered twice."""
    started = time.monotonic()
    until = started + seconds
    client_rngs = [random.Random(rng.random()) for _ in range(clients)]
    loops = [
        asyncio.create_task(
            client_loop(client, targets(i), r, history, until, f"c{i}-" if prefixed else "")
        )
        for i, r in enumerate(client_rngs)
    ]
    fault_rng = random.Random(rng.random())
    while time.monotonic() < until - 1:
        await asyncio.sleep(fault_rng.uniform(0.5, 2.0))
        if time.monotonic() < until - 1:
            await asyncio.to_thread(inject, fault_rng, history, started)
    await asyncio.gather(*loops)


HA_NODES = 4
HA_FAULTS = [
    "kill-leader", "pause-leader", "kill-etcd", "pause-etcd", "kill-follower", "pause-follower",
]  # fmt: skip


def inject_ha(cluster: HACluster, rng: random.Random, history: History, started: float) -> None:
    """One fault against an HA cluster, run to completion (a restarted node rejoins)."""
    kind = rng.choice(HA_FAULTS)
    now = time.monotonic() - started
    primaries = cluster.primaries()
    leader = primaries[0] if len(primaries) == 1 else None
    followers = [m.name for m in cluster.members if m.name != leader and m.running]
    if kind.endswith("etcd"):
        assert cluster.etcd is not None
        history.faults.append(Fault(kind, "etcd", now))
        if kind == "kill-etcd":
            cluster.etcd.kill()
            time.sleep(rng.uniform(0.2, 2.0))
            cluster.etcd.start()
        else:
            cluster.etcd.signal(signal.SIGSTOP)
            time.sleep(rng.uniform(0.2, 3.0))
            cluster.etcd.signal(signal.SIGCONT)
        return
    target = leader if kind.endswith("leader") and leader else rng.choice(followers)
    history.faults.append(Fault(kind if leader else f"{kind} (no leader)", target, now))
    if kind.startswith("kill"):
        cluster.kill(target)
        time.sleep(rng.uniform(0.1, 1.0))
        cluster.restart(target, timeout=60)
    else:
        cluster.pause(target)
        time.sleep(rng.uniform(0.2, 3.5))
        cluster.resume(target)


async def run_ha(
    seconds: float, seed: int, workdir: Path, clients: int = 4
) -> tuple[History, dict]:
    rng = random.Random(seed)
    history = History()
    cluster = HACluster(
        nodes=HA_NODES,
        quorum=WRITE_QUORUM,
        min_delay_ms=0,
        max_delay_ms=40,
        base_port=0,
        log_dir=workdir / "logs",
        data_dir=workdir / "data",
        scratch=workdir,
        extra_env={"LOG_LEVEL": "WARNING"},
    )
    with cluster:
        async with httpx.AsyncClient(timeout=10, trust_env=False, follow_redirects=True) as client:
            # Client i starts at node i, and follows its redirect to the leader.
            await faults_under_load(
                client, lambda i: cluster.urls[i:] + cluster.urls[:i],
                partial(inject_ha, cluster), rng, history, seconds, clients, prefixed=True,
            )  # fmt: skip
            leader = cluster.member(await asyncio.to_thread(heal_ha, cluster)).url
            final = await quiesce_urls(client, [leader, *(u for u in cluster.urls if u != leader)])
    return history, final


def heal_ha(cluster: HACluster) -> str:
    """Thaw etcd, then every node, restart the dead ones; the name of the node that leads."""
    if cluster.etcd is not None:
        cluster.etcd.signal(signal.SIGCONT)
    return cluster.heal(60)


def heal(cluster: LocalCluster) -> None:
    for index in range(FOLLOWERS):
        cluster.resume_follower(index)
    cluster.ensure_running()


async def quiesce(client: httpx.AsyncClient, cluster: LocalCluster, timeout: float = 30) -> dict:
    """Wait until every replica equals the leader; return the states and how long it took."""
    return await quiesce_urls(client, [cluster.leader_url, *cluster.follower_urls], timeout)


async def quiesce_urls(client: httpx.AsyncClient, urls: list[str], timeout: float = 30) -> dict:
    """Wait until every node's state equals the first's (the leader's)."""
    started = time.monotonic()
    while True:
        states = [(await client.get(f"{url}/state")).json() for url in urls]
        want = (states[0]["store"], states[0]["versions"])
        equal = all((s["store"], s["versions"]) == want for s in states[1:])
        if equal or time.monotonic() - started > timeout:
            return {"states": states, "converged": equal, "seconds": time.monotonic() - started}
        await asyncio.sleep(0.1)


def may_follow(later: Operation, op: Operation) -> bool:
    """Whether `later` may have been applied under a newer version than `op`'s.

    With a version, compare. Without one (no answer: the leader died after applying it,
    or before), it may have taken effect, after `op` if it was still in flight once `op`
    began; an unanswered operation is neither lost nor known to have happened.
    """
    assert op.version is not None
    if later.version is not None:
        return later.version > op.version
    return later.status is None and later.finished > op.started


def check(history: History, final: dict) -> tuple[list[str], int]:
    """The anomalies found over the whole history, and how many acknowledged writes were checked."""
    anomalies: list[str] = []
    by_version: dict[int, tuple[str, object, str]] = {}
    for op in history.operations:
        if op.status is not None and op.status >= 500 and op.status != 503:
            anomalies.append(f"{op.kind} {op.key}: HTTP {op.status}")
        if op.version is None:
            continue
        write = (op.key, op.value, op.kind)
        seen = by_version.setdefault(op.version, write)
        if seen != write:
            anomalies.append(f"version {op.version} given to {seen} and to {write}")
    if not final["converged"]:
        anomalies.append(f"replicas differ after {final['seconds']:.0f} s of quiescence")
    versions = final["states"][0]["versions"]
    store = final["states"][0]["store"]
    checked = 0
    for op in history.operations:
        if op.status != 200 or op.w < 1 or op.version is None:
            continue
        kept = [
            f for f in op.confirmers if not any(t > op.started for t in history.wipes.get(f, []))
        ]
        if not kept:
            continue  # every follower that confirmed it lost its memory since
        checked += 1
        held = versions.get(op.key)
        if op.kind == "write" and (held is None or held < op.version):
            # Absent with a newer deletion is fine: look for one in the history.
            deleted_later = any(
                o.kind == "delete" and o.key == op.key and may_follow(o, op)
                for o in history.operations
            )
            if not (held is None and deleted_later):
                anomalies.append(f"acknowledged write lost: {op.key}@{op.version} (holds {held})")
        if op.kind == "delete" and op.key in store and versions[op.key] < op.version:
            anomalies.append(f"deleted key returned: {op.key} (deleted at {op.version})")
    return anomalies, checked


def summary(history: History, final: dict, anomalies: list[str], checked: int, seed: int,
            seconds: float, ha: bool = False) -> str:  # fmt: skip
    outcomes = Counter(
        f"{op.kind} {'no answer' if op.status is None else op.status}" for op in history.operations
    )
    faults = Counter(f.kind for f in history.faults)
    lines = [
        f"nemesis: seed {seed}, {seconds:g} s, "
        + (f"{HA_NODES} HA nodes and etcd" if ha else f"{FOLLOWERS} followers")
        + f", WRITE_QUORUM {WRITE_QUORUM}",
        "",
        f"{'operations':<28}{len(history.operations):>8}",
        *(f"  {name:<26}{count:>8}" for name, count in sorted(outcomes.items())),
        f"{'faults injected':<28}{len(history.faults):>8}",
        *(f"  {name:<26}{count:>8}" for name, count in sorted(faults.items())),
        f"{'acknowledged writes checked':<28}{checked:>8}",
        f"{'converged after healing':<28}{final['seconds']:>7.2f}s",
        f"{'anomalies':<28}{len(anomalies):>8}",
        *(f"  {anomaly}" for anomaly in anomalies[:20]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to inject faults")
    parser.add_argument("--seed", type=int, default=None, help="replay a schedule (default random)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (4)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ha", action="store_true", help="HA nodes electing through etcd")
    mode.add_argument(
        "--net", action="store_true", help="HA nodes in network namespaces: partitions too"
    )
    parser.add_argument(
        "--out", type=Path, help="--net: the run's folder (default results/nemesis/net-SEED-TIME)"
    )
    parser.add_argument("--export-edn", action="store_true", help="--net: history.edn too")
    parser.add_argument(
        "--check-timeout", type=float, default=120, help="--net: seconds for the search (120)"
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(f"seed {seed}", flush=True)
    if args.net:
        return main_net(args, seed)
    with tempfile.TemporaryDirectory(prefix="kv-nemesis-") as scratch:
        runner = run_ha if args.ha else run
        history, final = asyncio.run(runner(args.seconds, seed, Path(scratch), args.clients))
    anomalies, checked = check(history, final)
    print(summary(history, final, anomalies, checked, seed, args.seconds, args.ha))
    return 1 if anomalies else 0


def main_net(args: argparse.Namespace, seed: int) -> int:
    """`--net`: 0 if linearizable and no anomaly, 1 on either, 2 if the search is undecided."""
    from tools.linearizability import Verdict
    from tools.nemesis_net import invariants, linearizable, net_summary, run_net, write_history

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).resolve().parent.parent / "results" / "nemesis" / (
        f"net-{seed}-{stamp}"
    )
    out.mkdir(parents=True, exist_ok=True)
    run = asyncio.run(run_net(args.seconds, seed, out, args.clients))
    path = write_history(run, args.export_edn)
    print(f"history: {path}", flush=True)
    result = linearizable(run, args.check_timeout)
    anomalies, checked = invariants(run)
    text = net_summary(run, result, anomalies, checked, seed, args.seconds)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    if anomalies or result.verdict is Verdict.ILLEGAL:
        return 1
    return 2 if result.verdict is Verdict.UNKNOWN else 0


if __name__ == "__main__":
    sys.exit(main())
