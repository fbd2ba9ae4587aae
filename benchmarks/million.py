"""A million keys: log replay, snapshot catch-up, memory, and write latency through both.

    python benchmarks/million.py                    # 1,000,000 keys, 3 followers, W=2
    python benchmarks/million.py --keys 200000

One cluster with DATA_DIR on every node. The keys are loaded into the followers directly
(hand-made /replicate batches, as benchmarks/rebuild.py does), then the leader starts and
reads them. It then measures, one after another:

* **memory:** every node's RSS holding the keys;
* **log replay:** a follower stopped and started on its DATA_DIR, from launch to /health,
  and how long the leader then takes to read its entries again (a late follower);
* **snapshot catch-up:** a follower restarted with an empty DATA_DIR, from launch until it
  holds every key again (the leader sends it a snapshot of its store);
* **writes through both:** an open-loop writer (`--rate` writes/s, W=2) runs for
  `--window` seconds of steady state, then through the replay and re-read, then through
  the snapshot; p50 and p99 of each are printed side by side, timed from each write's
  scheduled start.

Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rebuild import load, rss_mib  # noqa: E402  (beside this script)

from tools.cluster import LocalCluster, wait_healthy_nodes  # noqa: E402
from tools.loadgen import ConnectionPool  # noqa: E402
from tools.study import percentile  # noqa: E402


@dataclass
class Latencies:
    client: list[float]  # ms, from each write's scheduled start
    leader: list[float]  # ms, as the leader timed it


async def open_loop(url: str, rate: float, stop: asyncio.Event) -> Latencies:
    """Writes at `rate`/s until `stop` is set; each one's latency (ms) from its schedule, and
    the leader's own `latency_ms` of each (from its handler's start to its answer)."""
    latencies = Latencies([], [])
    async with ConnectionPool(url, 256) as pool:

        async def one(i: int, due: float) -> None:
            response = await pool.request("POST", "/keys?w=2", {"key": f"w{i % 500}", "value": i})
            if response.status == 200:
                latencies.client.append((time.monotonic() - due) * 1000)
                latencies.leader.append(response.json()["latency_ms"])

        await pool.warm(16)  # opened before the timetable starts, not timed as the store's
        tasks, start, i = [], time.monotonic(), 0
        while not stop.is_set():
            due = start + i / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i, due)))
            i += 1
        await asyncio.gather(*tasks)
    return latencies


async def quiet(client: httpx.AsyncClient, leader: str) -> bool:
    """Whether every follower is up and holds what the leader holds."""
    health = (await client.get(f"{leader}/health", timeout=30)).json()
    return all(r["state"] == "up" and r["lag"] == 0 for r in health["replicas"])


async def caught_up(client: httpx.AsyncClient, url: str, leader_version: int) -> bool:
    """Whether the follower at `url` holds every write up to `leader_version`: its
    `applied_through`, which the leader raises only past what it has confirmed."""
    try:
        state = (await client.get(f"{url}/health", timeout=5)).json()
    except (httpx.HTTPError, ValueError):
        return False
    return bool((state.get("applied_through") or 0) >= leader_version)


async def wait_quiet(client: httpx.AsyncClient, leader: str) -> None:
    while not await quiet(client, leader):  # noqa: ASYNC110
        await asyncio.sleep(0.2)  # polling other processes: there is no event to wait on


def summary(name: str, ms: Latencies, rate: float, steady: Latencies | None = None) -> str:
    client, leader = sorted(ms.client), sorted(ms.leader)
    line = (
        f"  writes {name:>20}: {len(client):>6} at {rate:g}/s  "
        f"p50 {percentile(client, 50):7.2f} p99 {percentile(client, 99):8.2f} ms "
        f"(leader's own p50 {percentile(leader, 50):5.2f} p99 {percentile(leader, 99):6.2f})"
    )
    if steady is not None:
        ratio = percentile(client, 99) / percentile(sorted(steady.client), 99)
        line += f"  {ratio:.1f}x the steady p99"
    return line


async def under_load(cluster: LocalCluster, args: argparse.Namespace) -> None:
    """Steady writes, then the same load through a log replay (and the leader's re-read of
    that follower), then through a snapshot to a follower restarted empty."""
    url = cluster.leader_url
    async with httpx.AsyncClient(trust_env=False) as client:
        await wait_quiet(client, url)
        stop = asyncio.Event()
        load = asyncio.create_task(open_loop(url, args.rate, stop))
        await asyncio.sleep(args.window)
        stop.set()
        steady = await load

        stop = asyncio.Event()
        load = asyncio.create_task(open_loop(url, args.rate, stop))
        replayed = cluster.nodes[1]
        await asyncio.to_thread(replayed.stop)
        started = time.monotonic()
        await asyncio.to_thread(replayed.start)
        await asyncio.to_thread(wait_healthy_nodes, [replayed], 600)
        replay = time.monotonic() - started
        await wait_quiet(client, url)  # the leader has read its entries again
        reread = time.monotonic() - started - replay
        stop.set()
        during_reread = await load

        stop = asyncio.Event()
        load = asyncio.create_task(open_loop(url, args.rate, stop))
        fresh = cluster.nodes[3]
        await asyncio.to_thread(cluster.restart_follower, 2, True)
        started = time.monotonic()
        leader_version = (await client.get(f"{url}/health")).json()["last_version"]
        while not await caught_up(client, fresh.url, leader_version):  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # polling another process: there is no event to wait on
        took = time.monotonic() - started
        stop.set()
        during_snapshot = await load
        count = (await client.get(f"{fresh.url}/keys", timeout=60)).json()["count"]
    print(f"log replay: follower 1 answered /health {replay:.1f} s after launch, its DATA_DIR "
          f"replayed; the leader had read its entries again {reread:.1f} s later")  # fmt: skip
    print(f"snapshot catch-up: a follower restarted empty held all {count:,} keys {took:.1f} s "
          f"after it was ready (process start not included)")  # fmt: skip
    print(summary("steady", steady, args.rate))
    print(summary("during replay+re-read", during_reread, args.rate, steady))
    print(summary("during snapshot", during_snapshot, args.rate, steady))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=300, help="writes/s of the load")
    parser.add_argument("--window", type=float, default=5, help="seconds of steady state")
    args = parser.parse_args()
    gc.freeze()
    gc.disable()  # the load generator's own pauses must not count against the store
    with tempfile.TemporaryDirectory(prefix="kv-million-") as scratch:
        cluster = LocalCluster(
            followers=3,
            quorum=2,
            max_delay_ms=0,
            base_port=0,
            log_dir=Path(scratch),
            data_dir=Path(scratch) / "data",
            extra_env={"LOG_LEVEL": "INFO"},
        )
        with cluster:
            cluster.kill_leader()

            async def load_all() -> None:
                async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
                    await asyncio.gather(
                        *(load(client, u, args.keys) for u in cluster.follower_urls)
                    )

            started = time.monotonic()
            asyncio.run(load_all())
            print(
                f"loaded {args.keys:,} keys into 3 followers in {time.monotonic() - started:.1f} s"
            )
            leader = cluster.nodes[0]
            started = time.monotonic()
            leader.start()
            wait_healthy_nodes([leader], timeout=600, path="/ready")
            print(f"leader ready {time.monotonic() - started:.1f} s after launch")
            rss = [rss_mib(n.process.pid) for n in cluster.nodes if n.process is not None]
            print("RSS MiB: leader {:.0f}, followers {}".format(
                rss[0], ", ".join(f"{r:.0f}" for r in rss[1:])))  # fmt: skip

            asyncio.run(under_load(cluster, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
