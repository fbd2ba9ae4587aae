"""A restarted follower catches up: one back empty is sent the whole store, one back with its
DATA_DIR (under writes) never is. Real uvicorn processes on loopback.

Which entries a follower that kept its data is sent is decided by kv/core/catchup.py and
proven in tests/unit/test_catchup.py and the model test (writes landing while the leader
reads a follower); here the wiring is checked end to end.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support import eventually, replicas_equal
from tools.cluster import LocalCluster

KEYS = 300


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
        yield c


async def replica(client: httpx.AsyncClient, leader: str, url: str) -> dict:
    health = (await client.get(f"{leader}/health")).json()
    return next(r for r in health["replicas"] if r["url"] == url)


@pytest.mark.parametrize("fresh", [False, True], ids=["with its DATA_DIR", "empty"])
async def test_a_restarted_follower_is_sent_what_it_lacks(
    client: httpx.AsyncClient, tmp_path: Path, fresh: bool
):
    with LocalCluster(
        followers=2,
        max_delay_ms=0,
        base_port=0,
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
        extra_env={"LOG_LEVEL": "INFO"},
    ) as cluster:
        leader, urls = cluster.leader_url, [cluster.leader_url, *cluster.follower_urls]
        for i in range(KEYS):
            response = await client.post(f"{leader}/keys?w=2", json={"key": f"k{i}", "value": i})
            assert response.status_code == 200, response.text
        follower = cluster.nodes[2]
        stop = asyncio.Event()

        async def writer() -> int:  # the newest keys, rewritten while it restarts
            count, deadline = 0, time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                key = f"k{KEYS - 1 - count % 20}"
                response = await client.post(f"{leader}/keys?w=1", json={"key": key, "value": -1})
                assert response.status_code == 200, response.text
                count += 1
            return count

        writes = asyncio.create_task(writer())
        await asyncio.to_thread(cluster.restart_follower, 1, fresh)

        async def caught_up() -> bool:
            state = await replica(client, leader, follower.url)
            return state["state"] == "up" and state["pending"] == 0

        await eventually(caught_up, 30, "the restarted follower catching up")
        stop.set()
        written = await writes
        await eventually(lambda: replicas_equal(client, urls), 30, "replicas converging")
        state = await replica(client, leader, follower.url)
        print(f"\n{written} writes during the restart; {state['resyncs']} resync(s) of "
              f"{state['resync_entries']} entries, of {KEYS} keys")  # fmt: skip
        if fresh:
            assert state["resyncs"] >= 1 and state["resync_entries"] >= KEYS
        else:
            assert state["resync_entries"] < KEYS * state["resyncs"] or state["resyncs"] == 0
