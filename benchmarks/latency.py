"""Write latency at a fixed offered load, measured without coordinated omission.

    python benchmarks/latency.py                        # W=3, 5 followers, 10 %..100 % of the max
    python benchmarks/latency.py --duration 3 --steps 50 70 90 --arrivals poisson

A closed-loop benchmark (wrk, throughput.py) waits for an answer before sending the next
request, so when the store stalls the load generator stalls with it and the stall is
counted once instead of for every request that should have been sent meanwhile
("coordinated omission", Gil Tene). This script first measures the maximum rate with a
closed loop (32 writes in flight through the lean client of tools/loadgen.py), then
offers writes on a fixed timetable (constant spacing, or Poisson arrivals) at each
fraction of that maximum, as wrk2 does, and measures every write from its *scheduled*
start: time spent waiting for a connection or behind a late generator counts. Its
connections are opened before each rate's timetable starts, as wrk2's are, so accepting
them is not charged to the store either, nor are the generator's own garbage collections
(its collector is off while it measures).

It prints p50, p99 and p99.9 at each rate (and, beside them, the leader's own
`latency_ms`, from its handler's start to its answer, which leaves out waiting to be
read), the first rate at which p99 exceeds 3x p50 (the knee), and draws
docs/latency_vs_load.png. The generator runs on the same two cores as the cluster, as
every benchmark here does; its CPU share is printed. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tools.cluster import LocalCluster  # noqa: E402
from tools.loadgen import ConnectionPool, closed_loop  # noqa: E402
from tools.study import percentile  # noqa: E402

DEFAULT_PLOT = HERE.parent / "docs" / "latency_vs_load.png"
WARM_CONNECTIONS = 64
"""Connections opened before each rate is measured: more than the writes in flight at the
maximum (about 5,000 writes/s at 5 ms each, 25); the pool opens more if they are needed."""


@dataclass
class Step:
    fraction: float
    offered: float
    achieved: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    generator_cpu: float  # fraction of one core
    leader_p50_ms: float  # as the leader times it: from its handler's start to its answer
    leader_p99_ms: float

    @property
    def spread(self) -> float:
        return self.p99_ms / self.p50_ms if self.p50_ms else float("inf")


async def closed_loop_max(url: str, quorum: int, duration: float) -> float:
    """Writes/s with 32 writes always outstanding: the most the store takes."""
    return await closed_loop(
        url,
        f"/keys?w={quorum}",
        lambda n, i: {"key": f"m{n}-{i % 50}", "value": "x" * 20},
        duration,
        in_flight=32,
    )


async def open_loop(
    url: str, quorum: int, rate: float, duration: float, poisson: bool, rng: random.Random
) -> tuple[list[float], list[float], int, float]:
    """Offer `rate` writes/s for `duration` s on a timetable; each write's latency in seconds
    from its scheduled start, the leader's own `latency_ms` of each, the number of errors,
    and the achieved rate."""
    count = max(1, int(rate * duration))
    schedule, at = [], 0.0
    for _ in range(count):
        schedule.append(at)
        at += rng.expovariate(rate) if poisson else 1 / rate
    latencies: list[float] = []
    leader_ms: list[float] = []
    errors = 0
    async with ConnectionPool(url, 512) as pool:

        async def one(i: int, due: float) -> None:
            nonlocal errors
            try:
                response = await pool.request(
                    "POST", f"/keys?w={quorum}", {"key": f"o{i % 1000}", "value": "x" * 20}
                )
                if response.status != 200:
                    errors += 1
                else:
                    leader_ms.append(response.json()["latency_ms"])
            except OSError:
                errors += 1
            latencies.append(time.monotonic() - due)

        await pool.warm(WARM_CONNECTIONS)  # as wrk2 opens its connections before it measures
        tasks = []
        start = time.monotonic() + 0.05
        for i, offset in enumerate(schedule):
            due = start + offset
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    return latencies, leader_ms, errors, count / elapsed


def run(args: argparse.Namespace, url: str) -> list[Step]:
    # The generator's own garbage collections would make it send late, and the lateness
    # would count against the store: freeze what exists and collect nothing while measuring
    # (a few hundred MB at most; wrk2, in C, has no collector either).
    gc.freeze()
    gc.disable()
    rng = random.Random(args.seed)
    maximum = asyncio.run(closed_loop_max(url, args.quorum, args.duration))
    print(f"closed-loop maximum at W={args.quorum}: {maximum:.0f} writes/s")
    steps = []
    for percent in args.steps:
        rate = maximum * percent / 100
        cpu = time.process_time()
        latencies, leader_ms, errors, achieved = asyncio.run(
            open_loop(url, args.quorum, rate, args.duration, args.arrivals == "poisson", rng)
        )
        cpu = (time.process_time() - cpu) / (len(latencies) / achieved)
        ms = sorted(latency * 1000 for latency in latencies)
        leader_ms.sort()
        step = Step(
            percent / 100,
            rate,
            achieved,
            percentile(ms, 50),
            percentile(ms, 99),
            percentile(ms, 99.9),
            errors,
            cpu,
            percentile(leader_ms, 50) if leader_ms else float("nan"),
            percentile(leader_ms, 99) if leader_ms else float("nan"),
        )
        steps.append(step)
        print(
            f"{percent:>4}% {rate:>8.0f}/s offered {achieved:>8.0f}/s sent  p50 {step.p50_ms:7.2f}"
            f"  p99 {step.p99_ms:8.2f}  p99.9 {step.p999_ms:8.2f} ms  p99/p50 {step.spread:5.1f}"
            f"  leader p50 {step.leader_p50_ms:5.2f} p99 {step.leader_p99_ms:6.2f}"
            f"  errors {errors}  generator {100 * cpu:.0f}% of a core",
            flush=True,
        )
    return steps


def report(steps: list[Step]) -> None:
    knee = next((s for s in steps if s.spread > 3), None)
    print(
        "\n| offered | writes/s | p50 ms | p99 ms | p99.9 ms | p99/p50 | leader p50 | leader p99 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in steps:
        print(f"| {s.fraction:.0%} | {s.offered:.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} | "
              f"{s.p999_ms:.2f} | {s.spread:.1f} | {s.leader_p50_ms:.2f} | "
              f"{s.leader_p99_ms:.2f} |")  # fmt: skip
    if knee is None:
        print("\np99 stays within 3x p50 at every rate measured")
    else:
        print(f"\nknee: p99 first exceeds 3x p50 at {knee.fraction:.0%} of the maximum "
              f"({knee.offered:.0f} writes/s)")  # fmt: skip
    print(f"median generator CPU: {100 * statistics.median(s.generator_cpu for s in steps):.0f}%")


def plot(steps: list[Step], path: Path, quorum: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    offered = [s.offered for s in steps]
    for name, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")):
        axes.plot(offered, [getattr(s, name) for s in steps], marker="o", label=label)
    for name, label in (
        ("leader_p50_ms", "p50, leader's own"),
        ("leader_p99_ms", "p99, leader's own"),
    ):
        axes.plot(offered, [getattr(s, name) for s in steps], linestyle="--", label=label)
    axes.set_yscale("log")
    axes.set_xlabel("offered load (writes/s, open loop)")
    axes.set_ylabel("latency from scheduled start (ms)")
    axes.set_title(f"Write latency against offered load, W={quorum}, 5 followers, no delay")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quorum", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=list(range(10, 101, 10)), metavar="PERCENT"
    )
    parser.add_argument("--arrivals", choices=["constant", "poisson"], default="constant")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--leader", help="measure this running leader instead of starting one")
    args = parser.parse_args()
    if args.duration <= 0 or not all(0 < p <= 200 for p in args.steps):
        parser.error("--duration must be positive and --steps between 1 and 200 (percent)")
    if args.leader:
        steps = run(args, args.leader)
    else:
        with (
            tempfile.TemporaryDirectory(prefix="latency-") as logs,
            LocalCluster(
                followers=5,
                quorum=args.quorum,
                max_delay_ms=0,
                base_port=0,
                log_dir=Path(logs),
                extra_env={"LOG_LEVEL": "WARNING"},
            ) as cluster,
        ):
            steps = run(args, cluster.leader_url)
    report(steps)
    plot(steps, args.plot, args.quorum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
