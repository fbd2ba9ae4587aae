"""Partitions, timed by the client: each scenario of tools/netlab/scenarios.py, R times.

    python benchmarks/partitions.py                          # every scenario 5 times (root)
    python benchmarks/partitions.py --runs 3 --scenario leader-cut-from-etcd
    python benchmarks/partitions.py --fresh                  # a new cluster for every run
    python benchmarks/partitions.py --soak 600 --rate-fraction 0.7
    python benchmarks/partitions.py --root /tmp/other        # the nodes run another checkout

Five HA nodes (W=2, delays 0..20 ms, a DATA_DIR each) and a three-member etcd, each in a
network namespace of its own (tools/netlab; needs root, iproute2 and nftables). Each run
heals the cluster, starts the writers, applies the fault, watches for five seconds, heals
and checks every acknowledged write (tools/writers.py's check). Per scenario it prints the
median and worst time from the fault to the first write acknowledged by a node on the
majority side, the longest silence clients heard, and the count of lost acknowledged
writes, versions acknowledged twice and terms acknowledged by two nodes, as a markdown
table for docs/benchmarks.md.

`--soak SECONDS`: no fault. The writers first run flat out for `--capacity-s` to measure
what the cluster takes, then at `--rate-fraction` of it for SECONDS; a change of leader
then is a false step-down.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import ROOT
from tools.netlab.cluster import NetCluster
from tools.netlab.load import Load
from tools.netlab.scenarios import SCENARIOS, Outcome, primaries_now, run, settle
from tools.netlab.system import NetlabUnavailable, preflight
from tools.writers import check


def cluster_for(args: argparse.Namespace, workdir: Path) -> NetCluster:
    return NetCluster(
        workdir,
        nodes=args.nodes,
        etcd_members=args.etcd_members,
        quorum=args.quorum,
        max_delay_ms=args.max_delay_ms,
        root=args.root,
    )


def seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f} s"


def row(name: str, outcomes: Sequence[Outcome], window_s: float) -> str:
    """One scenario's line of the table; a run with no write on the majority side within
    the window counts as longer than the window."""
    times = [o.first_ack_s if o.first_ack_s is not None else float("inf") for o in outcomes]
    median = statistics.median(times)
    worst = max(times)

    def shown(value: float) -> str:
        return f"> {window_s:g} s" if value == float("inf") else f"{value:.2f} s"

    missed = sum(1 for t in times if t == float("inf"))
    one_term_two_nodes = sum(
        1 for o in outcomes for problem in o.verdict.overlapping if problem.startswith("term ")
    )
    overlapping_terms = sum(len(o.verdict.overlapping) for o in outcomes) - one_term_two_nodes
    cells = [
        name,
        str(len(outcomes)),
        shown(median),
        shown(worst),
        str(missed),
        f"{max(o.max_gap_s for o in outcomes):.2f} s",
        str(sum(1 for o in outcomes if o.leader_changed)),
        str(sum(len(o.verdict.lost) for o in outcomes)),
        str(sum(len(o.verdict.duplicates) for o in outcomes)),
        str(one_term_two_nodes),
        str(overlapping_terms),
        str(sum(1 for o in outcomes if not o.converged)),
        str(sum(o.verdict.checked for o in outcomes)),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| scenario | runs | first write on the majority side, median | worst "
    "| runs with none in the window | longest silence | leader changed | lost "
    "| versions twice | terms with two nodes | overlapping terms | not converged "
    "| acks checked |\n|" + " --- |" * 13
)


async def scenarios(args: argparse.Namespace, workdir: Path) -> int:
    names = args.scenario or list(SCENARIOS)
    results: dict[str, list[Outcome]] = {name: [] for name in names}
    cluster: NetCluster | None = None
    failed: list[str] = []
    try:
        for n in range(args.runs):
            for name in names:
                if cluster is None or args.fresh:
                    if cluster is not None:
                        cluster.stop()
                    cluster = cluster_for(args, workdir / f"lab-{n}-{name}")
                    await asyncio.to_thread(cluster.start)
                outcome = await run(cluster, SCENARIOS[name], window_s=args.window, rate=args.rate)
                results[name].append(outcome)
                print(
                    f"run {n + 1} {name}: first majority ack {seconds(outcome.first_ack_s)}, "
                    f"longest silence {outcome.max_gap_s:.2f} s, {outcome.leader} -> "
                    f"{outcome.leader_after or 'none'}, {outcome.verdict}",
                    flush=True,
                )
    finally:
        if cluster is not None:
            cluster.stop()
    print()
    print(
        f"{args.nodes} HA nodes, W={args.quorum}, delays 0-{args.max_delay_ms:g} ms, "
        f"{args.etcd_members}-member etcd, {args.writers} writers at {args.rate:g} writes/s, "
        f"a {args.window:g} s window, {'a fresh' if args.fresh else 'one healed'} cluster "
        "per run:"
    )
    print()
    print(HEADER)
    for name, outcomes in results.items():
        if outcomes:
            print(row(name, outcomes, args.window))
    if failed:
        print(f"\n{len(failed)} runs could not settle (a fresh cluster followed each):")
        for line in failed:
            print(f"- {line[:300]}")
    unsafe = sum(1 for outcomes in results.values() for o in outcomes if not o.verdict.ok)
    return 1 if unsafe or failed else 0


async def soak(args: argparse.Namespace, workdir: Path) -> int:
    cluster = cluster_for(args, workdir / "soak")
    await asyncio.to_thread(cluster.start)
    try:
        async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
            leader = await settle(cluster, client)
            writers = args.soak_writers
            flat_out = Load(cluster.urls, "capacity-", writers, max_s=args.capacity_s + 5)
            await asyncio.sleep(1.0)  # connections open, the first redirects followed
            start = time.monotonic()
            await asyncio.sleep(args.capacity_s)
            capacity = len(flat_out.acks(start)) / (time.monotonic() - start)
            await flat_out.finish()
            rate = capacity * args.rate_fraction
            print(f"capacity {capacity:.0f} writes/s; soaking at {rate:.0f} for {args.soak:g} s")
            load = Load(cluster.urls, "soak-", writers, rate=rate, max_s=args.soak + 30)
            start = time.monotonic()
            changes, without = 0, 0.0
            current = [leader]
            while time.monotonic() - start < args.soak:
                await asyncio.sleep(0.5)
                found = await primaries_now(client, cluster.node_urls())
                if found != [leader]:
                    without += 0.5
                if found and found != current:
                    changes += 1
                current = found or current
            end = time.monotonic()
            await load.finish()
            done = load.acks(start)
            terms = sorted({a.term for a in done})
            leader = await settle(cluster, client)
            versions = (await client.get(f"{cluster.url_of(leader)}/state")).json()["versions"]
    finally:
        cluster.stop()
    verdict = check(load.log, versions)
    print()
    print(
        f"| soak | capacity | rate | writes acknowledged | longest silence | leader changes "
        f"(false step-downs) | terms | s without the first primary | {verdict.checked} checked |"
    )
    print("|" + " --- |" * 9)
    print(
        f"| {args.soak:g} s | {capacity:.0f}/s | {rate:.0f}/s ({args.rate_fraction:g}) "
        f"| {len(done)} | {load.max_gap(start, end):.2f} s | {changes} | {len(terms)} "
        f"| {without:g} | {'ok' if verdict.ok else verdict} |"
    )
    return 0 if verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs of each scenario (default 5)")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default all"
    )
    parser.add_argument("--fresh", action="store_true", help="a new cluster for every run")
    parser.add_argument("--window", type=float, default=5.0, help="seconds watched per fault")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--etcd-members", type=int, choices=(1, 3), default=3)
    parser.add_argument("--quorum", type=int, default=2, help="WRITE_QUORUM (default 2)")
    parser.add_argument("--max-delay-ms", type=float, default=20)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=150, help="writes/s in all (default 150)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout the nodes run")
    parser.add_argument("--soak", type=float, nargs="?", const=600.0, default=None,
                        metavar="SECONDS", help="no fault: run at --rate-fraction of capacity "
                        "for SECONDS (default 600) and count step-downs")  # fmt: skip
    parser.add_argument("--rate-fraction", type=float, default=0.7)
    parser.add_argument("--capacity-s", type=float, default=5.0)
    parser.add_argument(
        "--soak-writers", type=int, default=16,
        help="writers for the capacity and the soak (default 16: three are latency-bound)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        preflight()
    except NetlabUnavailable as exc:
        parser.error(str(exc))
    with tempfile.TemporaryDirectory(prefix="kv-partitions-") as tmp:
        job = soak if args.soak is not None else scenarios
        return asyncio.run(job(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
