"""Sequential write latency: one write at a time, as a single client sees it.

    python benchmarks/sequential.py                      # W=3, zero delay, 2000 writes
    python benchmarks/sequential.py --quorums 1 3 5 --writes 5000

Starts its own local cluster (five followers, zero simulated delay) unless
--leader names a running one. Prints the median and tail per quorum.
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import LocalCluster
from tools.loadgen import ConnectionPool
from tools.study import percentile


async def measure(leader: str, quorum: int, writes: int, warmup: int) -> list[float]:
    """One write at a time over one keep-alive connection, timed at the client."""
    latencies = []
    async with ConnectionPool(leader, 1) as connection:
        for i in range(warmup + writes):
            started = time.perf_counter()
            response = await connection.request(
                "POST", f"/keys?w={quorum}", {"key": f"k{i % 10}", "value": i}
            )
            elapsed = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise RuntimeError(f"write failed with {response.status}: {response.body[:200]!r}")
            if i >= warmup:
                latencies.append(elapsed)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quorums", type=int, nargs="+", default=[3])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--leader", help="a running leader's URL (default: start a cluster)")
    args = parser.parse_args()

    cluster = None
    leader = args.leader
    if leader is None:
        cluster = LocalCluster(followers=5, min_delay_ms=0, max_delay_ms=0, base_port=0).start()
        leader = cluster.leader_url
    try:
        print(f"{'W':>3} {'writes':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for quorum in args.quorums:
            samples = asyncio.run(measure(leader, quorum, args.writes, args.warmup))
            print(
                f"{quorum:>3} {len(samples):>7} {statistics.median(samples):>8.2f} "
                f"{percentile(samples, 90):>8.2f} {percentile(samples, 99):>8.2f} "
                f"{statistics.fmean(samples):>8.2f}"
            )
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
