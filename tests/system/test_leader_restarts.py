"""A restarted leader never reuses a version, never loses an acknowledged write, and never leaves
replicas diverged: each scenario of issue 9, against real uvicorn processes on loopback.

Each test starts its own small cluster on free ports and prints what it measured
(time to ready, time to converge, acknowledged writes checked).
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from kv.core.records import first_version, term_of
from kv.settings import DEVELOPMENT_SECRET
from tests.support import eventually, replicas_equal
from tools.cluster import LocalCluster

SECRET = {"X-Replication-Secret": DEVELOPMENT_SECRET}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
        yield c


def local(tmp_path: Path, followers: int, **kwargs) -> LocalCluster:
    env = {"LOG_LEVEL": "INFO", **kwargs.pop("extra_env", {})}
    return LocalCluster(
        followers=followers,
        max_delay_ms=kwargs.pop("max_delay_ms", 0),
        base_port=0,
        log_dir=tmp_path / "logs",
        extra_env=env,
        **kwargs,
    )


@pytest.fixture
def two_followers(tmp_path: Path) -> Iterator[LocalCluster]:
    """A leader without DATA_DIR; followers keep theirs (so one can be killed and come back)."""
    with local(tmp_path, 2, data_dir=tmp_path / "data") as cluster:
        leader = cluster.nodes[0]
        leader.env.pop("DATA_DIR")
        cluster.restart_leader()
        yield cluster


async def write(client: httpx.AsyncClient, leader: str, key: str, value: object, w: int) -> dict:
    response = await client.post(
        f"{leader}/keys?w={w}&timeout_ms=3000", json={"key": key, "value": value}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def converged(client: httpx.AsyncClient, cluster: LocalCluster, timeout: float) -> float:
    """Wait until every replica's store and versions equal the leader's; return the seconds."""
    urls = [cluster.leader_url, *cluster.follower_urls]
    return await eventually(lambda: replicas_equal(client, urls), timeout, "replicas converging")


async def ready_within(client: httpx.AsyncClient, leader: str, timeout: float) -> float:
    async def ready() -> bool:
        return (await client.get(f"{leader}/ready")).status_code == 200

    return await eventually(ready, timeout, "the leader becoming ready")


async def test_frozen_sole_holder_and_a_leader_without_data_dir(
    client: httpx.AsyncClient, two_followers: LocalCluster
):
    """The issue's scenario: the only follower holding the newest w=1 writes is frozen while
    the leader (no DATA_DIR) is killed and restarted; nothing acknowledged is lost."""
    cluster = two_followers
    leader = cluster.leader_url
    await write(client, leader, "x", 1, 2)
    await write(client, leader, "y", 1, 2)
    first_term = (await client.get(f"{leader}/state")).json()["term"]
    cluster.kill_follower(0)  # A is gone: B alone takes the next writes
    x2 = await write(client, leader, "x", 2, 1)
    deleted = await client.delete(f"{leader}/keys/y?w=1&timeout_ms=3000")
    assert deleted.status_code == 200 and deleted.json()["acks"] == 1
    acked_versions = [x2["version"], deleted.json()["version"]]
    cluster.pause_follower(1)  # B, the only holder of x=2 and of y's deletion, freezes
    cluster.kill_leader()
    cluster.restart_follower(0)  # A comes back from its log: x=1, y=1
    restarted = time.monotonic()
    cluster.restart_leader()
    ready_after = time.monotonic() - restarted

    state = (await client.get(f"{leader}/state")).json()
    assert state["term"] > first_term, "every leader start begins a newer term"
    z = await write(client, leader, "z", "new", 1)
    assert z["term"] == state["term"] and term_of(z["version"]) == z["term"]
    assert z["version"] > max(acked_versions), "no version is ever assigned twice"

    cluster.resume_follower(1)  # B is back: the leader reads it before resyncing it
    took = await converged(client, cluster, timeout=15)
    final = (await client.get(f"{leader}/state")).json()
    assert final["store"].get("x") == 2, "a w=1 write on the late follower is kept"
    assert "y" not in final["store"], "an acknowledged delete never resurrects"
    assert final["store"]["z"] == "new"

    # A w=2 write is confirmed only by followers that really hold it.
    x3 = await write(client, leader, "x", 3, 2)
    for url in cluster.follower_urls:
        assert (await client.get(f"{url}/keys/x")).json()["version"] == x3["version"]

    # A third leader start returns the same data.
    cluster.kill_leader()
    cluster.restart_leader()
    again = (await client.get(f"{leader}/state")).json()
    assert again["store"] == {"x": 3, "z": "new"} and again["term"] > final["term"]
    await converged(client, cluster, timeout=10)
    print(f"\nready {ready_after:.2f} s after restart; converged {took:.2f} s after the thaw")


async def test_a_batch_from_an_older_term_is_refused_with_both_terms(
    client: httpx.AsyncClient, tmp_path: Path
):
    with local(tmp_path, 2) as cluster:
        await write(client, cluster.leader_url, "k", "v", 2)
        cluster.kill_leader()
        cluster.restart_leader()
        await write(client, cluster.leader_url, "k", "v2", 2)  # the followers now know term 2
        follower = cluster.follower_urls[0]
        stale = {
            "term": 1,
            "leader_id": "a-dead-leader",
            "entries": [{"key": "k", "value": "stale", "version": 10**15, "deleted": False}],
        }
        response = await client.post(f"{follower}/replicate", json=stale, headers=SECRET)
        assert response.status_code == 409
        body = response.json()
        assert (body["follower_term"], body["batch_term"]) == (2, 1)
        assert "term 1" in body["error"] and "term 2" in body["error"]
        assert (await client.get(f"{follower}/keys/k")).json()["value"] == "v2"


async def test_a_starting_leader_waits_for_its_startup_quorum(
    client: httpx.AsyncClient, tmp_path: Path
):
    """N=3, W=2: STARTUP_QUORUM is 2. With two followers frozen, the restarted leader is alive
    but not ready; writes get 503 saying why; reads are served."""
    with local(tmp_path, 3, quorum=2) as cluster:
        leader = cluster.leader_url
        acked = await write(client, leader, "k", "v", 3)
        cluster.pause_follower(1)
        cluster.pause_follower(2)
        cluster.kill_leader()
        cluster.restart_leader(wait_ready=False)
        assert (await client.get(f"{leader}/health")).status_code == 200

        async def heard_from_one() -> bool:
            return (await client.get(f"{leader}/ready")).json()["heard_from"] == 1

        await eventually(heard_from_one, 10, "the leader reading the one follower it can")
        ready = await client.get(f"{leader}/ready")
        body = ready.json()
        assert ready.status_code == 503
        assert body["startup_quorum"] == 2 and not body["ready"]
        assert "1 of the 2" in body["reason"]
        refused = await client.post(f"{leader}/keys", json={"key": "k2", "value": 1})
        assert refused.status_code == 503 and "1 of the 2" in refused.json()["error"]
        read = await client.get(f"{leader}/keys/k")
        assert read.status_code == 200 and read.json()["version"] == acked["version"]

        thawed = time.monotonic()
        cluster.resume_follower(1)
        took = await ready_within(client, leader, 15)
        cluster.resume_follower(2)
        after = await write(client, leader, "k2", 1, 2)
        assert after["version"] > acked["version"]
        converge = await converged(client, cluster, timeout=15)
        print(
            f"\nready {took:.2f} s after the second follower thawed "
            f"({time.monotonic() - thawed:.2f} s incl. a write); converged {converge:.2f} s"
        )


async def test_everysec_tail_lost_in_a_power_cut_is_recovered_from_followers(
    client: httpx.AsyncClient, tmp_path: Path
):
    data = tmp_path / "data"
    with local(
        tmp_path, 2, data_dir=data, extra_env={"APPENDFSYNC": "everysec"}, timeout_ms=3000
    ) as cluster:
        leader = cluster.leader_url
        acked: dict[str, int] = {}
        for i in range(50):
            acked[f"k{i}"] = (await write(client, leader, f"k{i}", i, 2))["version"]
        await asyncio.sleep(1.2)  # everysec: the first 50 are on disk now
        logs = sorted((data / "leader").glob("log-*.jsonl"))
        sizes = {path: path.stat().st_size for path in logs}
        for i in range(50, 250):
            acked[f"k{i % 120}"] = (await write(client, leader, f"k{i % 120}", i, 2))["version"]
        cluster.kill_leader()
        for path, size in sizes.items():  # the power cut: what was not fsynced is gone
            with path.open("r+b") as handle:
                handle.truncate(size)
        for path in (data / "leader").glob("log-*.jsonl"):
            if path not in sizes:
                path.unlink()
        cluster.restart_leader()
        state = (await client.get(f"{leader}/state")).json()
        missing = {k: v for k, v in acked.items() if state["versions"].get(k) != v}
        assert missing == {}, f"{len(missing)} acknowledged writes lost"
        assert state["term"] == 2
        new = await write(client, leader, "after", 1, 2)
        assert new["version"] >= first_version(2) > max(acked.values())
        print(f"\n{len(acked)} acknowledged keys checked after the lost tail")


async def test_a_leader_rebuilds_a_store_larger_than_one_page(
    client: httpx.AsyncClient, tmp_path: Path
):
    keys = 25_000  # three pages of 10,000
    with local(tmp_path, 2) as cluster:
        cluster.kill_leader()
        for follower in cluster.follower_urls:
            for start in range(0, keys, 5_000):
                batch = [
                    {"key": f"key-{i}", "value": i, "version": i + 1, "deleted": False}
                    for i in range(start, start + 5_000)
                ]
                response = await client.post(
                    f"{follower}/replicate", json={"entries": batch}, headers=SECRET
                )
                assert response.status_code == 200
        started = time.monotonic()
        cluster.restart_leader()
        ready = time.monotonic() - started
        listing = (await client.get(f"{cluster.leader_url}/keys")).json()
        assert listing["count"] == keys
        assert (await client.get(f"{cluster.leader_url}/keys/key-24999")).json()["value"] == 24999
        health = (await client.get(f"{cluster.leader_url}/health")).json()
        assert all(r["resyncs"] == 0 for r in health["replicas"]), "in sync: no snapshot sent"
        print(f"\nrebuilt {keys} keys from 2 followers in {ready:.2f} s")


async def test_entries_inside_their_delay_do_not_count_against_the_queue_cap(
    client: httpx.AsyncClient, tmp_path: Path
):
    env = {"MAX_REPLICATION_QUEUE": "20"}
    with local(tmp_path, 2, max_delay_ms=400, extra_env=env) as cluster:
        leader = cluster.leader_url
        responses = await asyncio.gather(
            *(
                client.post(f"{leader}/keys?w=0", json={"key": f"k{i}", "value": i})
                for i in range(200)
            )
        )
        assert all(r.status_code == 200 for r in responses)
        quorum = await write(client, leader, "last", 1, 2)
        assert quorum["acks"] == 2
        health = (await client.get(f"{leader}/health")).json()
        assert all(r["resyncs"] == 0 for r in health["replicas"]), health
        await converged(client, cluster, timeout=10)


async def test_a_503_caused_by_an_overflowing_queue_says_so(
    client: httpx.AsyncClient, tmp_path: Path
):
    env = {"MAX_REPLICATION_QUEUE": "5"}
    with local(tmp_path, 2, extra_env=env) as cluster:
        leader = cluster.leader_url
        cluster.pause_follower(1)
        messages: list[str] = []
        for i in range(40):
            response = await client.post(
                f"{leader}/keys?w=2&timeout_ms=200", json={"key": f"k{i}", "value": i}
            )
            assert response.status_code == 503
            messages.append(response.json()["error"])
            if "MAX_REPLICATION_QUEUE=5" in messages[-1]:
                break
        assert any("MAX_REPLICATION_QUEUE=5" in m for m in messages), messages[-3:]
        cluster.resume_follower(1)
        await converged(client, cluster, timeout=15)
