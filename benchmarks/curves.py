"""Cost curves: throughput against followers, MB/s against value size, memory against keys.

    python benchmarks/curves.py                     # all three, a few minutes
    python benchmarks/curves.py --only followers    # or values, memory

* **Followers:** writes/s at W = a majority of N, for N = 1, 3, 5 and 9 followers (zero
  delay), driven by wrk like benchmarks/throughput.py, beside the bare FastAPI ceiling
  measured in the same run.
* **Value size:** writes/s and MB/s of values from 100 B to 1 MiB, 5 followers, W=3, with
  16 writes in flight through the lean client of tools/loadgen.py.
* **Memory:** a follower's RSS holding 10,000 to 1,000,000 small keys (`{"n": i}`, loaded
  with /replicate batches), and bytes per key, beside Redis's published figure of about
  100 MB for a million small keys.

Each measure is printed as a Markdown table. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from functools import partial
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rebuild import load, rss_mib, settled_rss_mib  # noqa: E402  (beside this script)
from throughput import run_wrk  # noqa: E402

from tools.cluster import HOST, LocalCluster, Node, free_port, wait_healthy  # noqa: E402
from tools.loadgen import closed_loop  # noqa: E402

QUIET = {"LOG_LEVEL": "WARNING", "ACCESS_LOG": "off"}
MIB = 1024 * 1024


def followers_curve(logs: Path, duration: float) -> None:
    bare = Node("bare_fastapi", free_port(), QUIET, logs / "bare.log", cwd=HERE)
    bare.start()
    try:
        wait_healthy([f"http://{HOST}:{bare.port}"], 30)
        ceiling = run_wrk(f"http://{HOST}:{bare.port}/keys", duration, 32).writes_per_s
        print("\n| followers | W | writes/s | of the ceiling | p99 ms |")
        print("|---|---|---|---|---|")
        for n in (1, 3, 5, 9):
            w = n // 2 + 1
            with LocalCluster(
                followers=n, quorum=w, max_delay_ms=0, base_port=0, log_dir=logs,
                extra_env=QUIET,
            ) as cluster:  # fmt: skip
                result = run_wrk(f"{cluster.leader_url}/keys?w={w}", duration, 32)
            print(f"| {n} | {w} | {result.writes_per_s:,.0f} | "
                  f"{result.writes_per_s / ceiling:.0%} | {result.p99_ms:.1f} |")  # fmt: skip
        print(f"(bare FastAPI ceiling in the same run: {ceiling:,.0f} requests/s)")
    finally:
        bare.stop()


def sized_write(value: str, n: int, i: int) -> dict[str, str]:
    return {"key": f"v{n}-{i % 20}", "value": value}


def values_curve(logs: Path, duration: float) -> None:
    print("\n| value size | writes/s | MB/s of values |")
    print("|---|---|---|")
    with LocalCluster(
        followers=5, quorum=3, max_delay_ms=0, base_port=0, log_dir=logs,
        extra_env={**QUIET, "MAX_VALUE_BYTES": str(2 * MIB)},
    ) as cluster:  # fmt: skip
        for size, label in ((100, "100 B"), (1024, "1 KiB"), (10 * 1024, "10 KiB"),
                            (100 * 1024, "100 KiB"), (MIB, "1 MiB")):  # fmt: skip
            value = "x" * (size - 2)  # its JSON, quotes included, is `size` bytes
            rate = asyncio.run(
                closed_loop(
                    cluster.leader_url,
                    "/keys?w=3",
                    partial(sized_write, value),
                    duration,
                    in_flight=16,
                )
            )
            print(f"| {label} | {rate:,.0f} | {rate * size / 1e6:,.1f} |")


def memory_curve(logs: Path) -> None:
    print("\n| keys | follower RSS MiB | bytes per key (over the empty node) |")
    print("|---|---|---|")
    with LocalCluster(followers=1, quorum=0, max_delay_ms=0, base_port=0, log_dir=logs,
                      extra_env=QUIET) as cluster:  # fmt: skip
        cluster.kill_leader()  # the follower's memory alone, nothing else talking to it
        follower = cluster.nodes[1]
        assert follower.process is not None
        empty = rss_mib(follower.process.pid)
        print(f"| 0 | {empty:.0f} | |")
        loaded = 0
        for keys in (10_000, 100_000, 1_000_000):

            async def more(count: int, start: int) -> None:
                async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
                    await load(client, follower.url, count, start=start)

            asyncio.run(more(keys - loaded, loaded))
            loaded = keys
            rss = settled_rss_mib(follower.process.pid)
            print(f"| {keys:,} | {rss:.0f} | {(rss - empty) * MIB / keys:,.0f} |")
    print("| 1,000,000 in Redis (published) | about 100 MB | about 100 |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["followers", "values", "memory"])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kv-curves-") as scratch:
        logs = Path(scratch)
        if args.only in (None, "followers"):
            followers_curve(logs, args.duration)
        if args.only in (None, "values"):
            values_curve(logs, args.duration)
        if args.only in (None, "memory"):
            memory_curve(logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
