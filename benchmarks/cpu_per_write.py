"""CPU time per write, leader and followers, side by side with another commit's code.

    python benchmarks/cpu_per_write.py --baseline HEAD~3          # 6 rounds x 4,000 writes each
    python benchmarks/cpu_per_write.py --baseline a1367ef --rounds 4 --writes 2000

Throughput on a shared 2-core machine swings by ±20% from one run to the next; the CPU a
process spends per write swings much less, because it does not count the time it waited
for a core. This script starts one cluster per checkout (5 followers, zero delay, W=3),
drives each in turn with the same load (16 writes in flight through the lean client in
tools/loadgen.py), reads each process's user + system time from /proc before and after,
and prints µs of CPU per write for the leader and for the five followers together, per
round and as medians, alternating which cluster goes first. Numbers are printed, never
asserted.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from throughput import baseline  # noqa: E402  (beside this script)

from tools.cluster import LocalCluster  # noqa: E402
from tools.loadgen import ConnectionPool  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def load(url: str, writes: int, in_flight: int = 16) -> None:
    async with ConnectionPool(url, in_flight) as pool:
        slots = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with slots:
                response = await pool.request(
                    "POST", "/keys?w=3", {"key": f"k{i % 100}", "value": "x" * 20}
                )
                if response.status != 200:
                    raise RuntimeError(f"write answered {response.status}")

        await asyncio.gather(*(one(i) for i in range(writes)))


def measure(cluster: LocalCluster, writes: int) -> tuple[float, float, float]:
    pids = [node.process.pid for node in cluster.nodes if node.process is not None]
    before = [cpu_seconds(pid) for pid in pids]
    started = time.monotonic()
    asyncio.run(load(cluster.leader_url, writes))
    elapsed = time.monotonic() - started
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    return used[0] / writes * 1e6, sum(used[1:]) / writes * 1e6, writes / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REF", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--writes", type=int, default=4000)
    args = parser.parse_args()
    quiet = {"LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory(prefix="kv-cpu-") as logs, baseline(args.baseline) as base:
        assert base is not None
        clusters = {
            label: LocalCluster(
                followers=5, quorum=3, max_delay_ms=0, base_port=0, extra_env=quiet,
                log_dir=Path(logs) / label, root=root,
            )
            for label, root in (("this", HERE.parent), ("base", base))
        }  # fmt: skip
        results: dict[str, list[tuple[float, float, float]]] = {label: [] for label in clusters}
        try:
            for cluster in clusters.values():
                cluster.start()
                asyncio.run(load(cluster.leader_url, 500))  # warm-up
            print(f"W=3, 5 followers, zero delay, {args.writes} writes per run; 'base' is "
                  f"{args.baseline}\n")  # fmt: skip
            print(f"{'round':>5} {'code':>5} {'leader µs/write':>16} {'followers µs/write':>19} "
                  f"{'writes/s':>9}")  # fmt: skip
            for round_ in range(1, args.rounds + 1):
                order = list(clusters.items())
                if round_ % 2 == 0:
                    order.reverse()
                for label, cluster in order:
                    leader, followers, rate = measure(cluster, args.writes)
                    results[label].append((leader, followers, rate))
                    print(f"{round_:>5} {label:>5} {leader:>16.0f} {followers:>19.0f} "
                          f"{rate:>9.0f}", flush=True)  # fmt: skip
        finally:
            for cluster in clusters.values():
                cluster.stop()
    medians = {
        label: [statistics.median(r[i] for r in rows) for i in range(3)]
        for label, rows in results.items()
    }
    print(f"\nmedians of {args.rounds} rounds, and this code against the baseline:")
    for i, name in enumerate(("leader µs/write", "followers µs/write", "writes/s")):
        new, old = medians["this"][i], medians["base"][i]
        print(f"  {name:>19}: {new:,.0f} against {old:,.0f}: {new / old:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
