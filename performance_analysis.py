"""The quorum-versus-latency study: one command, any cluster, a plot and a consistency verdict.

    python performance_analysis.py                       # the lab's study, 100 writes per quorum
    python performance_analysis.py --local               # always on a private cluster
    python performance_analysis.py --writes 1000         # tighter means
    python performance_analysis.py --quick               # a smoke run in seconds
    python performance_analysis.py --leader http://127.0.0.1:8000   # followers from its GET /
    python performance_analysis.py --leader http://127.0.0.1:8000 \\
        --followers http://127.0.0.1:8001,http://127.0.0.1:8002,...

Which cluster it measures, always said on its first line:
  --local             a private cluster it starts on free ports with the lab's settings
                      (5 followers, MIN_DELAY_MS=0, MAX_DELAY_MS=1000), stopped afterwards;
  --leader URL        that leader, which must answer; its followers are the ones it names
                      in GET / unless --followers says how to reach them from here;
  neither             the leader on 127.0.0.1:8000 if one answers there (`make run`),
                      otherwise a private cluster, as with --local.
Each quorum runs against the same cluster through the per-request `w`, so nothing
restarts between them.

Why latency grows with the quorum: each follower's delivery waits its own
uniformly drawn delay, and a write at quorum k returns when the k-th fastest of n
followers confirms. The mean of the k-th smallest of n uniform draws on
[MIN, MAX] is MIN + k/(n+1)·(MAX−MIN): the expectation drawn on the plot. What is
left, each write's latency minus the k-th smallest delay the leader reported for
it, is the replication overhead: how far the system is from the physical limit
of the network it simulates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from kv.client import KVClient, KVError
from kv.core.outbox import DelayModel
from tools.cluster import LocalCluster
from tools.loadgen import ConnectionPool
from tools.study import (
    ProgressBar,
    QuorumSummary,
    WriteResult,
    plot,
    print_table,
    summarise,
    write_csv,
)

# The lab's settings, for the cluster this script starts when none is running.
LAB_FOLLOWERS, LAB_MIN_DELAY_MS, LAB_MAX_DELAY_MS = 5, 0.0, 1000.0
DEFAULT_LEADER = "http://127.0.0.1:8000"
WARMUP_WRITES = 5


class ClusterError(Exception):
    """The cluster named on the command line cannot be measured; the message says why."""


async def run_quorum(
    pool: ConnectionPool,
    quorum: int,
    writes: int,
    concurrency: int,
    keys: int,
    label: str | None = None,
) -> list[WriteResult]:
    limit = asyncio.Semaphore(concurrency)
    progress = ProgressBar(writes, label or f"W={quorum}")

    async def write(index: int) -> WriteResult:
        key = f"perf-key-{index % keys}"
        async with limit:
            started = time.perf_counter()
            response = await pool.request(
                "POST", f"/keys?w={quorum}", {"key": key, "value": {"quorum": quorum, "i": index}}
            )
            latency_ms = (time.perf_counter() - started) * 1000
        body = response.json()
        progress.step()
        return WriteResult(
            quorum=quorum,
            index=index,
            key=key,
            status=response.status,
            latency_ms=round(latency_ms, 3),
            leader_latency_ms=body.get("latency_ms"),
            acks=body.get("acks", 0),
            version=body.get("version"),
            delays_ms=[d["delay_ms"] for d in body.get("replication", []) if d.get("ok")],
        )

    try:
        return list(await asyncio.gather(*(write(i) for i in range(writes))))
    finally:
        progress.close()


async def converge(
    client: httpx.AsyncClient, leader: str, followers: list[str], deadline_s: float
) -> dict[str, Any]:
    """Poll every replica's /state until it equals the leader's, or the deadline passes."""
    started = time.monotonic()
    converged_at: dict[str, float] = {}
    last_diff: dict[str, str] = {}
    while True:
        leader_state = (await client.get(f"{leader}/state")).json()
        want = (leader_state["store"], leader_state["versions"], leader_state["last_version"])
        for url in followers:
            if url in converged_at:
                continue
            try:
                state = (await client.get(f"{url}/state")).json()
            except httpx.HTTPError as error:
                last_diff[url] = f"unreachable: {type(error).__name__}"
                continue
            have = (state["store"], state["versions"], state["last_version"])
            if have == want:
                converged_at[url] = time.monotonic() - started
            else:
                behind = [k for k, v in want[1].items() if state["versions"].get(k) != v]
                extra = [k for k in state["versions"] if k not in want[1]]
                last_diff[url] = (
                    f"{len(behind)} key(s) differ, {len(extra)} extra, last_version "
                    f"{state['last_version']} vs {want[2]}"
                )
        elapsed = time.monotonic() - started
        if len(converged_at) == len(followers) or elapsed > deadline_s:
            break
        await asyncio.sleep(0.05)
    return {
        "converged": len(converged_at) == len(followers),
        "seconds": max(converged_at.values(), default=0.0),
        "replicas": {
            url: (
                {"verdict": "consistent", "seconds": round(converged_at[url], 3)}
                if url in converged_at
                else {"verdict": "DIVERGED", "difference": last_diff.get(url, "unknown")}
            )
            for url in followers
        },
    }


def cluster_answers(url: str) -> bool:
    try:
        with KVClient([url], deadline=1.0, timeout=1.0) as kv:
            kv.status(url)
        return True
    except KVError:
        return False


def followers_of(leader: str, given: str | None) -> list[str]:
    """The followers to check for convergence: `given`, or those the leader names in its
    /health. Each must answer from here."""
    try:
        with KVClient([leader], deadline=5.0) as kv:
            health = kv.status(leader)
    except KVError as error:
        raise ClusterError(f"{leader} did not describe itself at /health ({error})") from None
    if health.role != "leader":
        raise ClusterError(f"{leader} is a {health.role}, not a leader")
    followers = given.split(",") if given else [r.url for r in health.replicas or []]
    silent = [url for url in followers if not cluster_answers(url)]
    if silent:
        how = "--followers" if given else "the leader's GET / (pass --followers to override)"
        raise ClusterError(
            f"follower(s) {', '.join(silent)} from {how} do not answer from here; with docker "
            "compose, pass the published ports: --followers "
            "http://127.0.0.1:8001,...,http://127.0.0.1:8005"
        )
    return followers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--local",
        action="store_true",
        help="start a private cluster on free ports with the lab's settings, and stop it after",
    )
    where.add_argument(
        "--leader",
        default=None,
        help=f"measure the cluster of this leader (default: {DEFAULT_LEADER} if it answers, "
        "else a private cluster)",
    )
    parser.add_argument(
        "--followers",
        default=None,
        help="comma-separated follower URLs as reachable from here "
        "(default: those the leader names in GET /)",
    )
    parser.add_argument("--writes", type=int, default=100, help="writes per quorum (100)")
    parser.add_argument("--concurrency", type=int, default=10, help="writes in flight (10)")
    parser.add_argument("--keys", type=int, default=10, help="distinct keys written (10)")
    parser.add_argument("--quorums", type=int, nargs="+", default=None, help="default 1..n")
    parser.add_argument(
        "--quick", action="store_true", help="20 writes per quorum, for a smoke run"
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder")
    parser.add_argument(
        "--converge-timeout", type=float, default=None, help="seconds (default MAX_DELAY + 10 s)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.writes = min(args.writes, 20)
    for name in ("writes", "concurrency", "keys"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


async def study(args: argparse.Namespace, leader: str, followers: list[str]) -> int:
    # httpx for the few control requests; the lean pool for the measured writes (see loadgen.py).
    async with (
        httpx.AsyncClient(base_url=leader, timeout=60, trust_env=False) as client,
        ConnectionPool(leader, args.concurrency) as pool,
    ):
        config = (await client.get("/")).json()["config"]
        n = len(config["followers"])
        delays = DelayModel(config["min_delay_ms"], config["max_delay_ms"])
        quorums = args.quorums or list(range(1, n + 1))
        bad = [q for q in quorums if not 0 <= q <= n]
        if bad:
            print(f"error: --quorums {bad} outside 0..{n} followers", file=sys.stderr)
            return 2
        settings = {
            "leader": leader,
            "followers": n,
            "min_delay_ms": delays.min_ms,
            "max_delay_ms": delays.max_ms,
            "writes": args.writes,
            "concurrency": args.concurrency,
            "keys": args.keys,
            "quorums": quorums,
        }
        print(
            f"leader {leader}: {n} followers, delay {delays.min_ms:g}–{delays.max_ms:g} ms; "
            f"{args.writes} writes per quorum, {args.concurrency} in flight, {args.keys} keys",
            file=sys.stderr,
        )
        # Opens the pool's connections and warms both ends; not measured, not in the results.
        await run_quorum(
            pool, max(quorums), WARMUP_WRITES, args.concurrency, args.keys, "warm-up (discarded)"
        )

        results: list[WriteResult] = []
        summaries: list[QuorumSummary] = []
        for quorum in quorums:
            batch = await run_quorum(pool, quorum, args.writes, args.concurrency, args.keys)
            results.extend(batch)
            summaries.append(summarise(quorum, batch, delays, n))

        deadline = args.converge_timeout or delays.max_ms / 1000 + 10
        verdict = await converge(client, leader, followers, deadline)

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "writes.csv", results)
    plot(args.out / "quorum_vs_latency.png", summaries, settings)
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "quorums": [asdict(s) for s in summaries],
                "consistency": verdict,
            },
            indent=2,
        )
    )
    print_table(summaries)
    print(f"\nconsistency after the writes (deadline {deadline:g} s):")
    for url, replica in verdict["replicas"].items():
        detail = (
            f"equal to the leader after {replica['seconds']:.2f} s"
            if replica["verdict"] == "consistent"
            else replica["difference"]
        )
        print(f"  {url}: {replica['verdict']} ({detail})")
    if verdict["converged"]:
        print(f"all {len(followers)} replicas converged in {verdict['seconds']:.2f} s")
    print(f"\nwrote {args.out}/writes.csv, summary.json and quorum_vs_latency.png")
    return 0 if verdict["converged"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    local: LocalCluster | None = None
    try:
        leader = (args.leader or DEFAULT_LEADER).rstrip("/")
        if args.local or (args.leader is None and not cluster_answers(leader)):
            reason = "--local" if args.local else f"no cluster answers at {leader}"
            print(f"{reason}: starting a private cluster on free ports", file=sys.stderr)
            local = LocalCluster(
                followers=LAB_FOLLOWERS,
                min_delay_ms=LAB_MIN_DELAY_MS,
                max_delay_ms=LAB_MAX_DELAY_MS,
                base_port=0,
                log_dir=args.out / "logs",
            )
            local.start()
            leader, followers = local.leader_url, local.follower_urls
        else:
            if not cluster_answers(leader):
                raise ClusterError(
                    f"no leader answers at {leader}; start one (make run) or pass --local"
                )
            followers = followers_of(leader, args.followers)
            print(f"measuring the running cluster at {leader} ({len(followers)} followers)",
                  file=sys.stderr)  # fmt: skip
        return asyncio.run(study(args, leader, followers))
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    except (ClusterError, TimeoutError, RuntimeError, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if local is not None:
            local.stop()


if __name__ == "__main__":
    sys.exit(main())
