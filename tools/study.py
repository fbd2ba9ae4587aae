"""The quorum study's statistics, tables and plot: what performance_analysis.py computes and draws.

Kept apart from the script so that the arithmetic (percentiles, the order
statistic a quorum waits for, the overhead above it) is tested on its own.
"""

from __future__ import annotations

import csv
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kv.core.outbox import DelayModel


@dataclass
class WriteResult:
    quorum: int
    index: int
    key: str
    status: int
    latency_ms: float
    leader_latency_ms: float | None
    acks: int
    version: int | None
    delays_ms: list[float]

    def kth_delay_ms(self) -> float | None:
        """The k-th smallest simulated delay the leader reported: the physical floor."""
        if self.quorum == 0:
            return 0.0
        if len(self.delays_ms) < self.quorum:
            return None
        return sorted(self.delays_ms)[self.quorum - 1]

    def overhead_ms(self) -> float | None:
        kth = self.kth_delay_ms()
        return None if kth is None or self.status != 200 else self.latency_ms - kth


@dataclass
class QuorumSummary:
    quorum: int
    writes: int
    failures: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    expected_ms: float
    overhead_p50_ms: float
    overhead_p99_ms: float
    percentiles: dict[str, float] = field(default_factory=dict)


def percentile(samples: list[float], p: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(quorum: int, results: list[WriteResult], delays: DelayModel, n: int) -> QuorumSummary:
    ok = [r for r in results if r.status == 200]
    latencies = [r.latency_ms for r in ok]
    overheads = [o for r in ok if (o := r.overhead_ms()) is not None]
    nan = float("nan")
    return QuorumSummary(
        quorum=quorum,
        writes=len(results),
        failures=len(results) - len(ok),
        mean_ms=statistics.fmean(latencies) if latencies else nan,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        min_ms=min(latencies, default=nan),
        max_ms=max(latencies, default=nan),
        expected_ms=delays.expected_kth_fastest_ms(quorum, n),
        overhead_p50_ms=percentile(overheads, 50),
        overhead_p99_ms=percentile(overheads, 99),
        percentiles={f"p{p}": percentile(latencies, p) for p in (5, 25, 75)},
    )


class ProgressBar:
    """A one-line progress bar on a terminal; a line per quorum otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.tty = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.tty:
            width = 30
            filled = width * self.done // self.total
            bar = "#" * filled + "." * (width - filled)
            print(f"\r{self.label} [{bar}] {self.done}/{self.total}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
        else:
            print(f"{self.label}: {self.done}/{self.total} writes", file=sys.stderr)


def write_csv(path: Path, results: list[WriteResult]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "quorum", "index", "key", "status", "latency_ms", "leader_latency_ms", "acks",
                "version", "kth_delay_ms", "overhead_ms", "delays_ms",
            ]
        )  # fmt: skip
        for r in results:
            kth, overhead = r.kth_delay_ms(), r.overhead_ms()
            writer.writerow(
                [
                    r.quorum, r.index, r.key, r.status, r.latency_ms, r.leader_latency_ms,
                    r.acks, r.version,
                    "" if kth is None else round(kth, 3),
                    "" if overhead is None else round(overhead, 3),
                    ";".join(f"{d:.3f}" for d in r.delays_ms),
                ]
            )  # fmt: skip


def print_table(summaries: list[QuorumSummary]) -> None:
    header = (
        f"{'W':>2} {'writes':>6} {'fail':>4} {'mean':>7} {'p50':>7} {'p95':>7} {'p99':>7} "
        f"{'min':>7} {'max':>7} {'expect':>7} {'Δmean':>6} {'ovh50':>6} {'ovh99':>6}"
    )
    print("\nwrite latency in ms (client-side); expect = MIN + k/(n+1)·(MAX−MIN);")
    print("ovh50/ovh99 = p50/p99 of (latency − k-th smallest simulated delay)")
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(
            f"{s.quorum:>2} {s.writes:>6} {s.failures:>4} {s.mean_ms:>7.1f} {s.p50_ms:>7.1f} "
            f"{s.p95_ms:>7.1f} {s.p99_ms:>7.1f} {s.min_ms:>7.1f} {s.max_ms:>7.1f} "
            f"{s.expected_ms:>7.1f} {s.mean_ms - s.expected_ms:>+6.1f} "
            f"{s.overhead_p50_ms:>6.2f} {s.overhead_p99_ms:>6.2f}"
        )


def plot(path: Path, summaries: list[QuorumSummary], settings: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [s.quorum for s in summaries]
    fig, (ax, ax_overhead) = plt.subplots(
        1, 2, figsize=(12, 6), gridspec_kw={"width_ratios": [2.2, 1]}
    )
    ax.fill_between(
        ks,
        [s.percentiles["p5"] for s in summaries],
        [s.p95_ms for s in summaries],
        color="tab:blue",
        alpha=0.15,
        label="p5–p95",
    )
    ax.fill_between(
        ks,
        [s.percentiles["p25"] for s in summaries],
        [s.percentiles["p75"] for s in summaries],
        color="tab:blue",
        alpha=0.3,
        label="p25–p75",
    )
    ax.plot(ks, [s.p50_ms for s in summaries], "-", color="tab:blue", lw=1, label="median")
    ax.plot(ks, [s.p99_ms for s in summaries], "v:", color="tab:red", lw=1, label="p99")
    # The measured mean and the theory coincide when the system adds little, so the mean is a
    # thick line with large markers and the theory a thin dashed line drawn over it with small
    # markers: both stay visible where they overlap.
    ax.plot(
        ks,
        [s.mean_ms for s in summaries],
        "o-",
        color="tab:orange",
        lw=4,
        ms=10,
        alpha=0.85,
        zorder=4,
        label="mean (measured)",
    )
    ax.plot(
        ks,
        [s.expected_ms for s in summaries],
        "x--",
        color="black",
        lw=1.3,
        ms=7,
        zorder=5,
        label="expected: k-th fastest of n\nMIN + k/(n+1)·(MAX−MIN)",
    )
    # The numbers go in the tick labels, where they cannot print over the data or each other.
    ax.set_xticks(ks)
    ax.set_xticklabels(
        [f"{s.quorum}\nmean {s.mean_ms:.0f}\nexp. {s.expected_ms:.0f}" for s in summaries],
        fontsize=9,
    )
    ax.set_xlabel("write quorum W (followers that must confirm); latencies in ms")
    ax.set_ylabel("write latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    # Below the axes: inside, it would cover the bands it explains.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=9, frameon=False)
    ax.set_title("Write latency against the quorum")

    width = 0.38
    ax_overhead.bar(
        [k - width / 2 for k in ks], [s.overhead_p50_ms for s in summaries], width, label="p50"
    )
    ax_overhead.bar(
        [k + width / 2 for k in ks], [s.overhead_p99_ms for s in summaries], width, label="p99"
    )
    ax_overhead.set_xticks(ks)
    ax_overhead.set_xlabel("write quorum W")
    ax_overhead.set_ylabel("latency − k-th smallest delay (ms)")
    ax_overhead.set_title("Replication overhead")
    ax_overhead.grid(alpha=0.3, axis="y")
    ax_overhead.legend(fontsize=9)

    fig.suptitle(
        f"{settings['followers']} followers, delay uniform {settings['min_delay_ms']:g}–"
        f"{settings['max_delay_ms']:g} ms, {settings['writes']} writes per quorum, "
        f"{settings['concurrency']} in flight, {settings['keys']} keys",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
