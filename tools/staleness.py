"""The staleness study: how often a follower read misses a write it follows, against theory.

    python tools/staleness.py                      # W = 1..5, t = 0..MAX_DELAY_MS, the lab's delays
    python tools/staleness.py --samples 20 --step-ms 250     # quicker
    make staleness ARGS="--samples 80"

It starts a private cluster on free ports (5 followers, delays uniform on
MIN_DELAY_MS..MAX_DELAY_MS, 0..1000 ms by default). For each quorum W it writes
fresh keys at `?w=W`; once a write is acknowledged it waits t ms, for each t in
0, step, ..., MAX_DELAY_MS, and reads the key from a follower picked at random. The
read is fresh if it returns the write's version (or a newer one). The table and
`staleness_vs_time.png` show the measured share of fresh reads beside the prediction
of Probabilistically Bounded Staleness (tools/pbs.py). Then it repeats the reads at
t = 0 with `?min_version=` (the write's version) and `wait_ms`: no read may be stale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import LocalCluster
from tools.pbs import p_fresh
from tools.study import ProgressBar


@dataclass
class Read:
    quorum: int
    t_ms: float
    follower: int
    fresh: bool
    waited_ms: float
    with_min_version: bool


async def sample(
    client: httpx.AsyncClient,
    leader: str,
    followers: list[str],
    quorum: int,
    t_ms: float,
    rng: random.Random,
    min_version: bool,
    wait_ms: float,
) -> Read:
    key = f"stale-{rng.getrandbits(64):016x}"
    written = await client.post(f"{leader}/keys?w={quorum}", json={"key": key, "value": t_ms})
    written.raise_for_status()
    version = written.json()["version"]
    await asyncio.sleep(t_ms / 1000)
    index = rng.randrange(len(followers))
    params = {"min_version": version, "wait_ms": wait_ms} if min_version else {}
    started = time.monotonic()
    read = await client.get(f"{followers[index]}/keys/{quote(key, safe='')}", params=params)
    waited_ms = (time.monotonic() - started) * 1000
    fresh = read.status_code == 200 and read.json()["version"] >= version
    return Read(quorum, t_ms, index, fresh, round(waited_ms, 3), min_version)


async def run(args: argparse.Namespace, leader: str, followers: list[str]) -> list[Read]:
    rng = random.Random(args.seed)
    grid = [float(t) for t in range(0, int(args.max_delay_ms) + 1, args.step_ms)]
    limit = asyncio.Semaphore(args.concurrency)
    reads: list[Read] = []
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:

        async def one(quorum: int, t_ms: float, min_version: bool, bar: ProgressBar) -> None:
            async with limit:
                reads.append(
                    await sample(
                        client,
                        leader,
                        followers,
                        quorum,
                        t_ms,
                        rng,
                        min_version,
                        args.max_delay_ms + 2000,
                    )
                )
            bar.step()

        for quorum in args.quorums:
            jobs = [(t, False) for t in grid for _ in range(args.samples)]
            jobs += [(0.0, True)] * args.samples
            rng.shuffle(jobs)
            bar = ProgressBar(len(jobs), f"W={quorum}")
            try:
                await asyncio.gather(*(one(quorum, t, mv, bar) for t, mv in jobs))
            finally:
                bar.close()
    return reads


def table(reads: list[Read], args: argparse.Namespace, n: int) -> list[dict[str, float]]:
    rows = []
    for t in sorted({r.t_ms for r in reads if not r.with_min_version}):
        row: dict[str, float] = {"t_ms": t}
        for quorum in args.quorums:
            these = [
                r for r in reads if r.quorum == quorum and r.t_ms == t and not r.with_min_version
            ]
            row[f"W{quorum}"] = sum(r.fresh for r in these) / len(these)
            row[f"W{quorum}_predicted"] = p_fresh(
                t, quorum, n, args.min_delay_ms, args.max_delay_ms
            )
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, float]], quorums: list[int]) -> None:
    print("\nshare of fresh reads from a random follower, t ms after the acknowledgement")
    print("(measured / predicted by PBS)\n")
    print(f"{'t ms':>6} " + " ".join(f"{'W=' + str(q):>13}" for q in quorums))
    for row in rows:
        cells = " ".join(f"{row[f'W{q}']:>6.2f} / {row[f'W{q}_predicted']:.2f}" for q in quorums)
        print(f"{row['t_ms']:>6.0f} {cells}")


def plot(path: Path, rows: list[dict[str, float]], args: argparse.Namespace, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ts = [row["t_ms"] for row in rows]
    fine = [args.max_delay_ms * i / 200 for i in range(201)]
    palette = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown"]
    for i, quorum in enumerate(args.quorums):
        colour = palette[i % len(palette)]
        ax.plot(
            fine,
            [p_fresh(t, quorum, n, args.min_delay_ms, args.max_delay_ms) for t in fine],
            "--",
            color=colour,
            lw=1.3,
        )
        ax.plot(
            ts, [row[f"W{quorum}"] for row in rows], "o-", color=colour, lw=2, ms=5,
            label=f"W={quorum}",
        )  # fmt: skip
    ax.plot([], [], "k--", lw=1.3, label="predicted (PBS)")
    ax.plot([], [], "ko-", lw=2, ms=5, label="measured")
    ax.set_xlabel("time since the write was acknowledged, t (ms)")
    ax.set_ylabel("P(a read from a random follower returns the write)")
    ax.set_ylim(0, 1.03)
    ax.set_xlim(0, args.max_delay_ms)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title(
        f"Staleness: {n} followers, delays uniform {args.min_delay_ms:g}–{args.max_delay_ms:g} "
        f"ms, {args.samples} reads per point",
        fontsize=11,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--followers", type=int, default=5)
    parser.add_argument("--min-delay-ms", type=float, default=0.0)
    parser.add_argument("--max-delay-ms", type=float, default=1000.0)
    parser.add_argument("--step-ms", type=int, default=100, help="the grid of t (100 ms)")
    parser.add_argument("--samples", type=int, default=40, help="reads per (W, t) (40)")
    parser.add_argument("--quorums", type=int, nargs="+", default=None, help="default 1..n")
    parser.add_argument("--concurrency", type=int, default=40, help="samples in flight (40)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/staleness"))
    args = parser.parse_args(argv)
    args.quorums = args.quorums or list(range(1, args.followers + 1))
    if not all(1 <= q <= args.followers for q in args.quorums):
        parser.error(f"--quorums must be between 1 and {args.followers}")
    if args.samples < 1 or args.step_ms < 1 or args.max_delay_ms < args.min_delay_ms:
        parser.error("--samples and --step-ms must be positive, and MIN <= MAX")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.followers
    print(
        f"starting a private cluster: {n} followers, delays {args.min_delay_ms:g}–"
        f"{args.max_delay_ms:g} ms",
        file=sys.stderr,
    )
    cluster = LocalCluster(
        followers=n,
        min_delay_ms=args.min_delay_ms,
        max_delay_ms=args.max_delay_ms,
        base_port=0,
        log_dir=args.out / "logs",
        extra_env={"LOG_LEVEL": "WARNING"},
    )
    try:
        cluster.start()
        reads = asyncio.run(run(args, cluster.leader_url, cluster.follower_urls))
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        cluster.stop()
    rows = table(reads, args, n)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(args.out / "staleness_vs_time.png", rows, args, n)
    (args.out / "reads.json").write_text(json.dumps([asdict(r) for r in reads]))
    print_table(rows, args.quorums)
    guarded = [r for r in reads if r.with_min_version]
    stale = sum(1 for r in guarded if not r.fresh)
    waits = sorted(r.waited_ms for r in guarded)
    print(
        f"\nwith ?min_version= (the write's version) at t = 0: {stale} stale of {len(guarded)} "
        f"reads; the read waited {waits[len(waits) // 2]:.1f} ms at the median, "
        f"{waits[-1]:.1f} ms at most"
    )
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "table": rows,
        "min_version": {"reads": len(guarded), "stale": stale},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}/staleness_vs_time.png, reads.json and summary.json")
    return 0 if stale == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
