"""How long a leader with no data takes to rebuild from followers holding many keys.

    python benchmarks/rebuild.py                    # 1,000,000 keys on 2 followers
    python benchmarks/rebuild.py --keys 200000 --followers 3

It starts a local cluster without DATA_DIR, stops the leader, loads `--keys`
keys into every follower directly (hand-made `/replicate` batches), then starts
the leader again and times it from launch to `/ready` (it reads every follower's
entries page by page, STARTUP_QUORUM of them at least, and records its term on
them). It prints the load time, the time to ready, the leader's memory, and
checks that the leader lists every key. Numbers are printed, not asserted.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kv.settings import DEVELOPMENT_SECRET
from tools.cluster import LocalCluster, wait_healthy_nodes  # the repository root is on the path

BATCH = 20_000
MIB = 1024 * 1024


async def load(client: httpx.AsyncClient, url: str, keys: int, start: int = 0) -> None:
    """Give the follower at `url` keys `start` .. `start + keys - 1` directly.

    Each batch says, as a leader's does, that the follower then holds every version up to
    its last (`through`, for the process that answered the batch before): a follower
    otherwise holds every entry back in its change feed, waiting for that watermark, and
    its memory would measure the feed rather than the store."""
    node_id = None
    for first in range(start, start + keys, BATCH):
        entries = [
            {"key": f"key-{i:07d}", "value": {"n": i}, "version": i + 1, "deleted": False}
            for i in range(first, min(start + keys, first + BATCH))
        ]
        body: dict[str, object] = {"entries": entries}
        if node_id is not None:
            body.update(through=entries[-1]["version"], node_id=node_id)
        response = await client.post(
            f"{url}/replicate",
            content=json.dumps(body),
            headers={
                "X-Replication-Secret": DEVELOPMENT_SECRET,
                "content-type": "application/json",
            },
        )
        response.raise_for_status()
        node_id = response.json()["node_id"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settled_rss_mib(pid: int, still: float = 1.5, limit: float = 6.0) -> float:
    """RSS once it has stopped falling for `still` seconds (at most `limit`): a follower gives
    freed memory back a second after a bulk of entries (TrimAfterBulk), not as it ends."""
    deadline = time.monotonic() + limit
    low, since = rss_mib(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < still:
        time.sleep(0.25)
        if (now := rss_mib(pid)) < low - 0.5:
            low, since = now, time.monotonic()
    return rss_mib(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--followers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kv-rebuild-") as scratch:
        cluster = LocalCluster(
            followers=args.followers,
            max_delay_ms=0,
            base_port=0,
            log_dir=Path(scratch),
            extra_env={"LOG_LEVEL": "INFO"},
        )
        with cluster:
            cluster.kill_leader()

            async def load_all() -> float:
                started = time.monotonic()
                async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
                    await asyncio.gather(
                        *(load(client, u, args.keys) for u in cluster.follower_urls)
                    )
                return time.monotonic() - started

            loaded = asyncio.run(load_all())
            print(
                f"loaded {args.keys:,} keys into each of {args.followers} followers "
                f"in {loaded:.1f} s"
            )
            leader = cluster.nodes[0]
            started = time.monotonic()
            leader.start()
            wait_healthy_nodes([leader], timeout=600, path="/ready")
            ready = time.monotonic() - started
            assert leader.process is not None
            memory = rss_mib(leader.process.pid)
            with httpx.Client(timeout=300, trust_env=False) as client:
                count = client.get(f"{cluster.leader_url}/keys").json()["count"]
                health = client.get(f"{cluster.leader_url}/health").json()
            resyncs = [replica["resyncs"] for replica in health["replicas"]]
            print(
                f"leader ready {ready:.1f} s after launch (process start included), "
                f"RSS {memory:.0f} MiB"
            )
            print(f"leader lists {count:,} keys; snapshots sent to followers: {resyncs}")
            return 0 if count == args.keys else 1


if __name__ == "__main__":
    sys.exit(main())
