"""Debian's real HAProxy with monitoring/haproxy.cfg in front of an HA cluster: clients
keep writing through one address across a leader kill, and nothing acknowledged is lost.

Skips without the haproxy or etcd binaries, and fails under CI=true, where .ci/run
installs both.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import eventually
from tools.cluster import ROOT, HACluster, free_port, spawn, stop_process
from tools.writers import WriteLog, check, write_loop

MISSING = [name for name in ("haproxy", "etcd") if shutil.which(name) is None]
if MISSING:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI must install {' and '.join(MISSING)} (see .ci/run)")
    pytest.skip(f"not installed: {', '.join(MISSING)}", allow_module_level=True)

pytestmark = pytest.mark.timeout(180)


def haproxy_env(cluster: HACluster, port: int) -> dict[str, str]:
    """monitoring/haproxy.cfg's addresses, moved to this cluster's ports (it reads them from
    the environment; nodes it lists beyond this cluster's stay at closed ports, down)."""
    env = {"KV_BIND": f"127.0.0.1:{port}"}
    for index, member in enumerate(cluster.members):
        env[f"KV_NODE{index + 1}"] = f"127.0.0.1:{member.port}"
    return env


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[HACluster, str]]:
    cluster = HACluster(
        nodes=4,
        quorum=2,  # three followers, of which two outlive the leader
        base_port=0,
        max_delay_ms=100,
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
        scratch=tmp_path,
    ).start()
    port = free_port()
    proxy = spawn(
        ["haproxy", "-f", str(ROOT / "monitoring" / "haproxy.cfg"), "-db"],
        tmp_path / "haproxy.log",
        env=haproxy_env(cluster, port),
    )
    try:
        yield cluster, f"http://127.0.0.1:{port}"
    finally:
        stop_process(proxy, 10)
        cluster.stop()


async def test_writes_through_haproxy_carry_on_across_a_leader_kill(
    proxied: tuple[HACluster, str],
) -> None:
    cluster, proxy = proxied
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:

        async def writable() -> bool:
            try:
                answer = await client.post(f"{proxy}/keys", json={"key": "probe", "value": 1})
            except httpx.HTTPError:
                return False
            return answer.status_code == 200

        await eventually(writable, 15, "a write through HAProxy")
        reads = [await client.get(f"{proxy}/keys/probe") for _ in range(8)]
        assert all(r.status_code in (200, 404) for r in reads)  # a follower may lag a moment

        log, stop = WriteLog(), asyncio.Event()
        writers = [
            asyncio.create_task(write_loop(client, [proxy], f"hap{i}", log, stop)) for i in range(4)
        ]
        try:
            await eventually(lambda: asyncio.sleep(0, len(log.acks) >= 20), 20, "writes")
            leader = cluster.wait_for_primary(10)
            old_term = max(a.term for a in log.acks)
            killed_at = time.monotonic()
            cluster.kill(leader)
            await eventually(
                lambda: asyncio.sleep(0, any(a.term > old_term for a in log.acks)),
                20,
                "a write acknowledged by the new leader through HAProxy",
            )
            first = min(a.at for a in log.acks if a.term > old_term)
            print(
                f"\nthrough HAProxy: the new leader's first write {first - killed_at:.2f} s "
                "after the kill"
            )
        finally:
            stop.set()
            await asyncio.gather(*writers)
        new = cluster.wait_for_primary(10)
        assert new != leader
        state = (await client.get(f"{cluster.member(new).url}/state")).json()
        verdict = check(log, state["versions"])
        assert verdict.ok, verdict
        assert len({a.term for a in log.acks}) >= 2
