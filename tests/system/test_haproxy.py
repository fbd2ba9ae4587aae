"""Debian's real HAProxy with monitoring/haproxy.cfg in front of an HA cluster: clients
keep writing through one address across a leader kill, and nothing acknowledged is lost.

Skips without the haproxy or etcd binaries, and fails under CI=true, where .ci/run
installs both.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import eventually
from tools.cluster import ROOT, HACluster, die_with_parent, free_port
from tools.writers import WriteLog, check, write_loop

MISSING = [name for name in ("haproxy", "etcd") if shutil.which(name) is None]
if MISSING:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI must install {' and '.join(MISSING)} (see .ci/run)")
    pytest.skip(f"not installed: {', '.join(MISSING)}", allow_module_level=True)

pytestmark = pytest.mark.timeout(180)


def haproxy_config(cluster: HACluster, port: int) -> str:
    """monitoring/haproxy.cfg with its addresses (make run-ha's) moved to this cluster's."""
    text = (ROOT / "monitoring" / "haproxy.cfg").read_text()
    text = text.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{port}")
    for index, member in enumerate(cluster.members):
        text = re.sub(rf"127\.0\.0\.1:{8000 + index}\b", f"127.0.0.1:{member.port}", text)
    names = {member.name for member in cluster.members}
    lines = text.splitlines(keepends=True)
    return "".join(  # the file lists six nodes; this cluster may have fewer
        line for line in lines if not line.strip().startswith("server ") or line.split()[1] in names
    )


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
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(cluster, port))
    proxy = subprocess.Popen(
        ["haproxy", "-f", str(config), "-db"],
        stdout=(tmp_path / "haproxy.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    try:
        yield cluster, f"http://127.0.0.1:{port}"
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
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
