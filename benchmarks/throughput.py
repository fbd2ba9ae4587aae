"""Write throughput under load, side by side with a bare FastAPI ceiling, in one run.

    python benchmarks/throughput.py                 # 3 rounds x (ceiling, W=1, W=3, W=5), 10 s each
    python benchmarks/throughput.py --rounds 1 --duration 5
    python benchmarks/throughput.py --profile       # also py-spy's top entries in the leader
    python benchmarks/throughput.py --baseline HEAD~3   # and that commit's code, side by side
    python benchmarks/throughput.py --security      # and W=3 with TLS, with tokens, with both

It starts a local cluster (5 followers, zero simulated delay, LOG_LEVEL=WARNING,
uvloop and httptools) and a bare FastAPI POST endpoint under the same uvicorn
settings, plus a second cluster launched exactly as the docs say
(`python -m uvicorn leader:app --port N`, every setting at its default: uvicorn's
INFO logging, the app's default ACCESS_LOG), measured at W=3 as "plain W=3", so
the speed a new user gets is reported beside the tuned one. It drives each with
wrk (Debian's `wrk` package) and `write.lua`: one wrk thread, --connections
keep-alive connections. Rounds interleave the targets, so a noisy neighbour hits
them all alike, and the table reports the median over rounds. wrk's own CPU use
is reported, to show the load generator is not the bottleneck. With --baseline
REF, the code at that git ref (checked out in a temporary worktree) runs as a
second cluster in the same rounds, so a change is measured against what it
changed under the same noise. Sequential latency (one write at a time on one
connection) comes from the lean client in loadgen.py. With --security, three more
clusters run at W=3 in the same rounds: HTTPS with mutual TLS between the nodes
(certificates from tools/certs.py; wrk speaks TLS to the leader), bearer tokens
(AUTH_FILE, a token on every request), and both; each is reported against the plain one.
Numbers are printed, never asserted.
"""

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sequential import measure  # noqa: E402  (beside this script)

from kv.core.access import token_digest  # noqa: E402
from tools.certs import make_certs  # noqa: E402
from tools.cluster import (  # noqa: E402
    HOST,
    QUIET_UVICORN,
    LocalCluster,
    Node,
    free_port,
    wait_healthy,
)
from tools.study import percentile  # noqa: E402


@dataclass
class LoadResult:
    target: str
    writes_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    wrk_cpu: float  # fraction of one core


def run_wrk(url: str, duration: float, connections: int, token: str = "") -> LoadResult:
    """One wrk run; its CPU time comes from the kernel's accounting of the child."""
    process = subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "-s", str(HERE / "write.lua"), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "KV_BENCH_TOKEN": token},
    )
    started = time.monotonic()
    _, _, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    output = process.stdout.read() if process.stdout else ""
    process.returncode = 0  # reaped by wait4
    line = next((x for x in output.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result for {url}:\n{output}")
    stats = json.loads(line.removeprefix("RESULT "))
    errors = sum(stats[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        target=url,
        writes_per_s=stats["requests"] / (stats["duration_us"] / 1e6),
        p50_ms=stats["p50_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        errors=errors,
        wrk_cpu=(usage.ru_utime + usage.ru_stime) / elapsed,
    )


async def sequential(leader: str, quorum: int, writes: int) -> tuple[float, float]:
    """Median and p99 of one-at-a-time writes, as benchmarks/sequential.py measures them."""
    latencies = await measure(leader, quorum, writes, warmup=200)
    return statistics.median(latencies), percentile(latencies, 99)


def profile_leader(cluster: LocalCluster, duration: float, connections: int, top: int) -> None:
    """py-spy samples the leader under W=3 load; prints the functions with the most own time."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    leader = cluster.nodes[0].process
    if leader is None or not Path(py_spy).exists():
        print("\n(profile skipped: py-spy is not installed; pip install -r requirements-dev.txt)")
        return
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "leader.txt"
        load = subprocess.Popen(
            [
                "wrk", "-t1", f"-c{connections}", f"-d{duration + 2:g}s",
                "-s", str(HERE / "write.lua"), f"{cluster.leader_url}/keys?w=3",
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(1)
            subprocess.run(
                [
                    py_spy, "record", "--pid", str(leader.pid), "--duration", f"{duration:g}",
                    "--rate", "500", "--format", "raw", "--output", str(raw), "--nonblocking",
                ],
                check=True,
                capture_output=True,
            )  # fmt: skip
        finally:
            load.wait()
        own: dict[str, int] = {}
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            frame = stack.rsplit(";", 1)[-1] or "(native)"
            own[frame] = own.get(frame, 0) + int(samples)
            total += int(samples)
    print(f"\nleader profile at W=3 (py-spy, {total} samples; own time, top {top}):")
    for frame, hits in sorted(own.items(), key=lambda item: -item[1])[:top]:
        print(f"  {100 * hits / total:5.1f}%  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--quorums", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--sequential-writes", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="print the leader's top entries")
    parser.add_argument(
        "--baseline", metavar="REF", help="also run this git ref's code, side by side"
    )
    parser.add_argument(
        "--no-plain", action="store_true", help="skip the cluster launched as the docs say"
    )
    parser.add_argument(
        "--security", action="store_true", help="also W=3 with TLS, with tokens, and with both"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian's package)", file=sys.stderr)
        return 2

    quiet = {"LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as logs, baseline(args.baseline) as base:
        clusters = {"": cluster_at(HERE.parent, Path(logs) / "new", quiet)}
        if base is not None:
            clusters["base "] = cluster_at(base, Path(logs) / "base", quiet)
        secure = secure_clusters(Path(logs), quiet) if args.security else {}
        plain = None if args.no_plain else cluster_at(HERE.parent, Path(logs) / "plain", {}, ())
        bare = Node("bare_fastapi", free_port(), quiet, Path(logs) / "bare.log", cwd=HERE)
        bare.start()
        try:
            for cluster in [*clusters.values(), *secure.values(), *([plain] if plain else [])]:
                cluster.start()
            wait_healthy([f"http://{HOST}:{bare.port}"], 30)
            targets = {"ceiling": f"http://{HOST}:{bare.port}/keys"}
            for label, cluster in clusters.items():
                targets |= {
                    f"{label}W={w}": f"{cluster.leader_url}/keys?w={w}" for w in args.quorums
                }
            if plain is not None:
                targets["plain W=3"] = f"{plain.leader_url}/keys?w=3"
            tokens: dict[str, str] = {}
            for label, cluster in secure.items():
                targets[f"{label} W=3"] = f"{cluster.leader_url}/keys?w=3"
                if cluster.auth_file is not None:
                    tokens[f"{label} W=3"] = BENCH_TOKEN
            print(
                f"5 followers, zero delay; wrk -t1 -c{args.connections}, {args.duration:g} s per "
                f"run, {args.rounds} round(s)"
                + (f"; 'base' rows run {args.baseline}" if base is not None else "")
                + "\n"
            )
            print(f"{'round':>5} {'target':>10} {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
                  f"{'errors':>6} {'wrk cpu':>7}")  # fmt: skip
            results: dict[str, list[LoadResult]] = {name: [] for name in targets}
            for round_ in range(1, args.rounds + 1):
                # Whatever runs first in a round was measured slower here; alternating the
                # order of the compared targets each round cancels that out.
                order = list(targets.items())
                if round_ % 2 == 0:
                    order = order[:1] + order[1:][::-1]
                for name, url in order:
                    token = tokens.get(name, "")
                    run_wrk(url, 2, args.connections, token)  # warm-up, discarded
                    result = run_wrk(url, args.duration, args.connections, token)
                    results[name].append(result)
                    print(
                        f"{round_:>5} {name:>10} {result.writes_per_s:>9.0f} "
                        f"{result.p50_ms:>7.2f} {result.p99_ms:>7.2f} {result.errors:>6} "
                        f"{100 * result.wrk_cpu:>6.0f}%",
                        flush=True,
                    )
            seq = {
                f"{label}W={w}": asyncio.run(sequential(c.leader_url, w, args.sequential_writes))
                for label, c in clusters.items()
                for w in args.quorums
            }
            if plain is not None:
                seq["plain W=3"] = asyncio.run(
                    sequential(plain.leader_url, 3, args.sequential_writes)
                )
            for label in secure:  # the lean client speaks neither TLS nor tokens
                seq[f"{label} W=3"] = (float("nan"), float("nan"))
            report(results, seq, [name for name in targets if name != "ceiling"])
            if plain is not None and "W=3" in results:
                tuned = statistics.median(r.writes_per_s for r in results["W=3"])
                documented = statistics.median(r.writes_per_s for r in results["plain W=3"])
                print(f"\nlaunched as the docs say, at W=3: {documented:,.0f} writes/s, "
                      f"{documented / tuned:.2f} of the tuned launch ({tuned:,.0f})")  # fmt: skip
            if base is not None:
                print("\nthis code against the baseline (median writes/s, ratio):")
                for w in args.quorums:
                    new = statistics.median(r.writes_per_s for r in results[f"W={w}"])
                    old = statistics.median(r.writes_per_s for r in results[f"base W={w}"])
                    print(f"  W={w}: {new:,.0f} against {old:,.0f}: {new / old:.2f}")
            if secure and "W=3" in results:
                plain_w3 = statistics.median(r.writes_per_s for r in results["W=3"])
                print("\nW=3 with security on, against W=3 without it (median writes/s, ratio):")
                for label in secure:
                    on = statistics.median(r.writes_per_s for r in results[f"{label} W=3"])
                    print(f"  {label}: {on:,.0f} against {plain_w3:,.0f}: {on / plain_w3:.2f}")
            if args.profile:
                profile_leader(clusters[""], args.duration, args.connections, top=5)
        finally:
            for cluster in [*clusters.values(), *secure.values(), *([plain] if plain else [])]:
                cluster.stop()
            bare.stop()
    return 0


def cluster_at(
    root: Path, logs: Path, env: dict[str, str], uvicorn_args: tuple[str, ...] = QUIET_UVICORN
) -> LocalCluster:
    return LocalCluster(
        followers=5,
        min_delay_ms=0,
        max_delay_ms=0,
        base_port=0,
        extra_env=env,
        log_dir=logs,
        root=root,
        uvicorn_args=uvicorn_args,
    )


BENCH_TOKEN = "bench-token-" + "4f" * 16


def secure_clusters(folder: Path, env: dict[str, str]) -> dict[str, LocalCluster]:
    """W=3 clusters with TLS ("tls"), with tokens ("auth"), and with both ("tls+auth")."""
    certs = folder / "certs"
    make_certs(certs, ["leader", *(f"follower{i}" for i in range(1, 6))])
    auth = folder / "auth.toml"
    auth.write_text(
        f'[[tokens]]\nname = "bench"\nsha256 = "{token_digest(BENCH_TOKEN)}"\nrole = "readwrite"\n'
    )
    clusters = {}
    kinds = (("tls", True, False), ("auth", False, True), ("tls+auth", True, True))
    for label, tls, tokens in kinds:
        cluster = cluster_at(HERE.parent, folder / label, env)
        cluster.certs = certs if tls else None
        cluster.auth_file = auth if tokens else None
        clusters[label] = cluster
    return clusters


@contextmanager
def baseline(ref: str | None) -> Iterator[Path | None]:
    """A temporary git worktree at `ref`, removed afterwards; None without a ref."""
    if ref is None:
        yield None
        return
    repo = HERE.parent
    with tempfile.TemporaryDirectory(prefix="kv-baseline-") as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), ref],
            check=True,
            capture_output=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
            )


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def report(
    results: dict[str, list[LoadResult]], seq: dict[str, tuple[float, float]], names: list[str]
) -> None:
    def med(name: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results[name])

    ceiling = med("ceiling", "writes_per_s")
    print(f"\nmedian of {len(results['ceiling'])} round(s):")
    print(f"{'':>10} {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
          f"{'seq p50':>8} {'seq p99':>8} {'of ceiling':>10}")  # fmt: skip
    ceiling_errors = sum(r.errors for r in results["ceiling"])
    print(f"{'ceiling':>10} {ceiling:>9.0f} {med('ceiling', 'p50_ms'):>7.2f} "
          f"{med('ceiling', 'p99_ms'):>7.2f} {ceiling_errors:>6}")  # fmt: skip
    for name in names:
        print(
            f"{name:>10} {med(name, 'writes_per_s'):>9.0f} {med(name, 'p50_ms'):>7.2f} "
            f"{med(name, 'p99_ms'):>7.2f} {sum(r.errors for r in results[name]):>6} "
            f"{ms(seq[name][0]):>8} {ms(seq[name][1]):>8} "
            f"{med(name, 'writes_per_s') / ceiling:>10.0%}"
        )
    if "W=1" in results and "W=5" in results:
        ratio = med("W=5", "writes_per_s") / med("W=1", "writes_per_s")
        print(f"\nW=5 / W=1 throughput: {ratio:.2f}")
    cpu = max(r.wrk_cpu for rs in results.values() for r in rs)
    print(f"wrk used at most {100 * cpu:.0f}% of one core")


if __name__ == "__main__":
    sys.exit(main())
