"""Failover time, measured by the client: leader faults under load on an HA cluster.

    python benchmarks/failover.py                    # 20 SIGKILLs of the leader, default settings
    python benchmarks/failover.py --fault term       # graceful hand-overs (SIGTERM)
    python benchmarks/failover.py --fault pause      # SIGSTOP the leader; SIGCONT once replaced
    python benchmarks/failover.py --rounds 5 --max-delay-ms 100

It starts a private etcd and `--nodes` HA nodes (`python -m kv.ha`, default six, every
setting at its default unless given: WRITE_QUORUM 3, a majority of six, delays
0..1000 ms) on free loopback ports, each with a DATA_DIR. `--writers` clients write
unique keys all along, following redirects (tools/writers.py). Each round faults the
leader's process group, and measures from the signal to the first write acknowledged
after it, at the default quorum. The old leader is then restarted (kill, term) or
resumed (pause), and the next round waits until the cluster has one leader again.

At the end every acknowledged write is checked on the leader: lost, acknowledged twice,
or acknowledged by two nodes at once. Prints one line per round, then p50 and max.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import HACluster
from tools.writers import WriteLog, check, write_loop

FAULTS = {"kill": "SIGKILL", "term": "SIGTERM", "pause": "SIGSTOP"}


async def first_ack_after(
    log: WriteLog, moment: float, timeout: float, not_from: str | None = None
) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ack = log.first_ack_after(moment, not_from)
        if ack is not None:
            return ack.at - moment
        await asyncio.sleep(0.005)
    return None


async def run(args: argparse.Namespace, workdir: Path) -> int:
    cluster = HACluster(
        nodes=args.nodes,
        quorum=args.quorum,
        min_delay_ms=args.min_delay_ms,
        max_delay_ms=args.max_delay_ms,
        base_port=0,
        log_dir=workdir / "logs",
        data_dir=workdir / "data",
        scratch=workdir,
        extra_env={"LOG_LEVEL": "WARNING"},
    )
    times: list[float] = []
    log = WriteLog()
    stop = asyncio.Event()
    with cluster:
        quorum = args.quorum if args.quorum is not None else min(3, args.nodes - 1)
        print(
            f"{args.rounds} x {FAULTS[args.fault]} of the leader under load: "
            f"{args.nodes} HA nodes, "
            f"W={quorum}, delays {args.min_delay_ms:g}..{args.max_delay_ms:g} ms, "
            f"{args.writers} writers; etcd {cluster.etcd.url if cluster.etcd else '?'}",
            flush=True,
        )
        # A paused leader answers nothing: a client learns it only by its own timeout, so
        # the writers give up after 2 s (each write asks for its quorum within 1.5 s).
        async with httpx.AsyncClient(timeout=2.0, trust_env=False, follow_redirects=True) as client:
            writers = [
                asyncio.create_task(
                    write_loop(client, cluster.urls, f"w{i}", log, stop, timeout_ms=1500)
                )
                for i in range(args.writers)
            ]
            try:
                for round_ in range(1, args.rounds + 1):
                    leader = await asyncio.to_thread(cluster.wait_for_primary, 60)
                    if await first_ack_after(log, time.monotonic(), 30) is None:
                        print("no write acknowledged before the fault; stopping", file=sys.stderr)
                        return 1
                    faulted_at = time.monotonic()
                    if args.fault == "kill":
                        cluster.kill(leader)
                    elif args.fault == "term":
                        cluster.terminate(leader)
                    else:
                        cluster.pause(leader)
                    took = await first_ack_after(log, faulted_at, 30, cluster.member(leader).url)
                    new = await asyncio.to_thread(cluster.wait_for_primary, 30, [leader])
                    if took is None:
                        print(f"round {round_}: no write acknowledged within 30 s", flush=True)
                        return 1
                    times.append(took)
                    print(
                        f"round {round_:>2}: {leader} -> {new}: {took * 1000:7.0f} ms", flush=True
                    )
                    if args.fault == "pause":
                        cluster.resume(leader)
                    else:
                        member = cluster.member(leader)
                        if member.process is not None:
                            await asyncio.to_thread(member.process.wait, 15)
                        member.process = None
                        await asyncio.to_thread(cluster.restart, leader)
                    await asyncio.sleep(args.settle)
            finally:
                stop.set()
                await asyncio.gather(*writers)
            leader = await asyncio.to_thread(cluster.wait_for_primary, 30)
            state = (await client.get(f"{cluster.member(leader).url}/state")).json()
    verdict = check(log, state["versions"])
    print()
    print(f"failover, from {FAULTS[args.fault]} to the first acknowledged write:")
    print(f"  p50 {statistics.median(times) * 1000:.0f} ms   max {max(times) * 1000:.0f} ms   "
          f"min {min(times) * 1000:.0f} ms   over {len(times)} rounds")  # fmt: skip
    print(f"  writes attempted {log.attempts}, acknowledged {len(log.acks)}")
    print(f"  {verdict}")
    print(f"  lost {len(verdict.lost)}, acknowledged twice {len(verdict.duplicates)}, "
          f"two leaders at once {len(verdict.overlapping)}")  # fmt: skip
    return 0 if verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=sorted(FAULTS), default="kill")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--quorum", type=int, default=None, help="WRITE_QUORUM (default 3)")
    parser.add_argument("--min-delay-ms", type=float, default=0)
    parser.add_argument("--max-delay-ms", type=float, default=1000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between rounds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kv-failover-") as scratch:
        return asyncio.run(run(args, Path(scratch)))


if __name__ == "__main__":
    sys.exit(main())
