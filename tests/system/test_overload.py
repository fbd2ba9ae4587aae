"""A minute of overload: more writes than the leader can replicate, with its memory bounded.

Every follower is frozen (SIGSTOP), so nothing can be replicated, while clients
write as fast as the leader answers: asynchronous writes (w=0) that queue
replication for every follower, and quorum writes (w=3) that cannot succeed.
Without a bound the leader would queue every write for every follower; with
MAX_REPLICATION_QUEUE it replaces an overflowing queue by a snapshot resync, and
quorum writes are answered 503 at once. Afterwards the followers thaw and must
converge. KV_OVERLOAD_SECONDS shortens the minute for a quick local run.
"""

import asyncio
import os
import random
import time
from collections import deque
from pathlib import Path

import httpx
import pytest

from tests.support import eventually, replicas_equal, rss_bytes
from tools.cluster import LocalCluster
from tools.loadgen import ConnectionPool

SECONDS = float(os.environ.get("KV_OVERLOAD_SECONDS", "60"))
QUEUE_CAP = 2000
KEYS = 1000
MIB = 1024 * 1024


@pytest.fixture
def frozen_cluster(tmp_path: Path):
    cluster = LocalCluster(
        followers=5,
        max_delay_ms=0,
        base_port=0,
        extra_env={"MAX_REPLICATION_QUEUE": str(QUEUE_CAP), "LOG_LEVEL": "ERROR"},
        log_dir=tmp_path,
    )
    with cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 120)
async def test_a_minute_of_overload_keeps_the_leaders_memory_bounded(
    frozen_cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
):
    cluster = frozen_cluster
    leader = cluster.nodes[0].process
    assert leader is not None
    for index in range(len(cluster.follower_urls)):
        cluster.pause_follower(index)

    samples: list[tuple[float, int]] = []
    statuses: dict[int, int] = {}
    # The latest few: the first ones wait for their timeout, before the leader sees the
    # frozen followers time out themselves; later ones fail fast.
    quorum_errors: deque[str] = deque(maxlen=5)
    rng = random.Random(5)
    value = "x" * 200
    started = time.monotonic()
    deadline = started + SECONDS

    async def writer(pool: ConnectionPool) -> None:
        while time.monotonic() < deadline:
            quorum = 3 if rng.random() < 0.2 else 0
            response = await pool.request(
                "POST",
                f"/keys?w={quorum}&timeout_ms=200",
                {"key": f"key-{rng.randrange(KEYS)}", "value": value},
            )
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status == 503:
                quorum_errors.append(response.json()["error"])

    async def sampler() -> None:
        while time.monotonic() < deadline:
            elapsed, rss = time.monotonic() - started, rss_bytes(leader.pid)
            samples.append((elapsed, rss))
            if len(samples) % 10 == 0:
                with capsys.disabled():  # a minute is long: say how it is going, live
                    writes = sum(statuses.values())
                    print(f"\n  overload {elapsed:3.0f}/{SECONDS:g} s: {writes} writes, "
                          f"leader RSS {rss / MIB:.1f} MiB", end="", flush=True)  # fmt: skip
            await asyncio.sleep(1)

    try:
        async with ConnectionPool(cluster.leader_url, 16) as pool:
            await asyncio.gather(sampler(), *(writer(pool) for _ in range(16)))
    finally:
        for index in range(len(cluster.follower_urls)):
            cluster.resume_follower(index)

    writes = sum(statuses.values())
    print(f"\n{writes} writes in {SECONDS:g} s ({writes / SECONDS:.0f}/s): {statuses}")
    print("leader RSS (MiB) every 5 s:", [round(rss / MIB, 1) for _, rss in samples[::5]])
    assert set(statuses) <= {200, 503}, "every write got an answer"
    assert statuses.get(200, 0) > writes / 2 and statuses.get(503, 0) > 0
    assert quorum_errors and all("reachable" in error for error in quorum_errors), quorum_errors

    # Would be ~a hundred MiB and growing without the cap: every write queued five times.
    baseline = samples[min(5, len(samples) - 1)][1]
    peak = max(rss for _, rss in samples)
    third = len(samples) // 3
    middle = max(rss for _, rss in samples[third : 2 * third])
    last = max(rss for _, rss in samples[2 * third :])
    print(f"baseline {baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB")
    assert peak - baseline < 48 * MIB
    assert last - middle < 16 * MIB, "no upward trend in the last third"

    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        health = (await client.get(f"{cluster.leader_url}/health")).json()
        assert all(replica["resyncs"] >= 2 for replica in health["replicas"])
        urls = [cluster.leader_url, *cluster.follower_urls]
        took = await eventually(
            lambda: replicas_equal(client, urls), 15, "followers converging after thawing"
        )
        print(f"all followers converged {took:.2f} s after thawing")
