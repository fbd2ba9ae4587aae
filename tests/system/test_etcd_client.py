"""kv/ha/etcd.py against a real etcd (Debian's, 3.4 here), on free loopback ports: leases
from grant to expiry, and the gateway's answers the unit tests' fake etcd copies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kv.ha.etcd import Etcd, EtcdRefused
from tests.support import require_etcd
from tools.cluster import PrivateEtcd, free_port


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[PrivateEtcd]:
    require_etcd()
    server = PrivateEtcd(tmp_path / "etcd", log_path=tmp_path / "etcd.log")
    try:
        yield server.start()
    finally:
        server.stop()  # by the PID it started


async def time_to_live(url: str, lease: int) -> int:
    """etcd's own view of `lease`: its remaining TTL (0 is left out), -1 once it is gone."""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
        answer = await http.post(f"{url}/v3/lease/timetolive", json={"ID": str(lease)})
    return int(answer.json().get("TTL", 0))


async def test_a_lease_from_grant_to_expiry_and_revoke(etcd: PrivateEtcd) -> None:
    client = Etcd([etcd.url], "/test", "n1")
    try:
        lease, ttl = await client.grant(2)
        assert ttl >= 2
        assert await client.keepalive(lease) >= 2
        await client.revoke(lease)
        assert await time_to_live(etcd.url, lease) == -1
        await client.revoke(lease)  # etcd no longer has it: revoked already, still success
        assert await client.keepalive(lease) == 0
        assert await client.keepalive(123456789) == 0  # never granted: the same answer

        lease, ttl = await client.grant(2)
        deadline = time.monotonic() + ttl + 10
        while await time_to_live(etcd.url, lease) != -1:  # no keepalive meanwhile: it expires
            assert time.monotonic() < deadline, f"lease {lease} did not expire in {ttl} s"
            await asyncio.sleep(0.1)
        # The quirk keepalive() reads: a 200 with the header and the ID, and no TTL.
        async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
            raw = await http.post(f"{etcd.url}/v3/lease/keepalive", json={"ID": str(lease)})
        assert raw.status_code == 200
        result = raw.json()["result"]
        assert "header" in result and result["ID"] == str(lease) and "TTL" not in result
        assert await client.keepalive(lease) == 0
        await client.revoke(lease)  # expired: success
    finally:
        await client.aclose()


async def test_etcds_refusal_names_the_endpoint_and_a_dead_endpoint_is_left(
    etcd: PrivateEtcd,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = Etcd([dead, etcd.url], "/test", "n1")
    try:
        view = await client.read()
        assert view.leader is None
        assert client.current == etcd.url
        with pytest.raises(EtcdRefused, match=f"etcd at {etcd.url} refused /v3/lease/grant: "
                           "etcdserver: too large lease TTL") as refused:  # fmt: skip
            await client.grant(10**11)
        assert refused.value.code == 11
    finally:
        await client.aclose()
