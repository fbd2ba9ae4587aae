"""Automatic failover: HA nodes (`python -m kv.ha`) electing their leader through a real,
private etcd, faulted with real signals to their process groups.

Each test names the point of the failover contract (docs/concepts/failover.md)
it checks. Without the etcd binary they skip saying so, and fail under CI=true, where
.ci/run installs it.

Against docker compose's `ha` profile instead (the container job, .ci/container-job.sh):

    KV_HA_COMPOSE_PROJECT=kv KV_HA_NODES=ha1=http://127.0.0.1:8010,...,ha6=http://127.0.0.1:8015 \
    python -m pytest tests/system/test_failover.py -m "not local"

where the faults go through compose (kill -s SIGKILL, kill -s SIGTERM, pause, unpause,
stop and start of etcd); tests that start clusters of their own are marked `local`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from kv.ha.decide import ClusterView
from kv.ha.etcd import Etcd
from tests.support import eventually
from tools.cluster import ROOT, ComposeHACluster, HACluster, HAControl, PrivateEtcd
from tools.writers import WriteLog, check, write_loop

if shutil.which("etcd") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI must install etcd-server (see .ci/run)")
    pytest.skip("etcd is not installed (apt-get install etcd-server)", allow_module_level=True)

pytestmark = pytest.mark.timeout(240)
DELAY_MS = 100


def start(tmp_path: Path, nodes: int = 6, **kwargs: object) -> HACluster:
    return HACluster(
        nodes=nodes,
        base_port=0,
        max_delay_ms=DELAY_MS,
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
        scratch=tmp_path,
        extra_env={"LOG_LEVEL": "INFO"},
        **kwargs,  # type: ignore[arg-type]
    ).start()


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAControl]:
    project = os.environ.get("KV_HA_COMPOSE_PROJECT")
    if project:
        nodes = dict(part.split("=", 1) for part in os.environ["KV_HA_NODES"].split(","))
        yield ComposeHACluster(project, nodes)
        return
    cluster = start(tmp_path_factory.mktemp("ha"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        yield c


async def state_of(client: httpx.AsyncClient, url: str) -> dict:
    return (await client.get(f"{url}/state")).json()


async def converged(client: httpx.AsyncClient, cluster: HAControl) -> bool:
    states = [await state_of(client, url) for url in cluster.urls]
    want = (states[0]["store"], states[0]["versions"])
    return all((s["store"], s["versions"]) == want for s in states[1:])


class Load:
    """Writers running in the background against every node, following redirects."""

    def __init__(self, cluster: HAControl, prefix: str, writers: int = 4) -> None:
        self.cluster = cluster
        self.log = WriteLog()
        self.stop = asyncio.Event()
        # Under compose a redirect names the leader's address inside the compose network:
        # the writers then move on to the next published port instead of following it.
        self.client = httpx.AsyncClient(timeout=10, trust_env=False, follow_redirects=cluster.local)
        self.tasks = [
            asyncio.create_task(
                write_loop(self.client, cluster.urls, f"{prefix}{i}", self.log, self.stop)
            )
            for i in range(writers)
        ]

    async def acks_after(
        self, moment: float, count: int = 1, timeout: float = 20, not_from: str | None = None
    ) -> float:
        """Wait for `count` acknowledgements after `moment` (from any node but `not_from`);
        the seconds from `moment` to the first."""

        def heard() -> int:
            return sum(1 for a in self.log.acks if a.at > moment and a.node != not_from)

        await eventually(
            lambda: asyncio.sleep(0, heard() >= count), timeout, f"{count} acknowledged writes"
        )
        first = self.log.first_ack_after(moment, not_from)
        assert first is not None
        return first.at - moment

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        await self.client.aclose()


# -- 1. one node = python -m kv.ha, configured by the environment --------------------------


@pytest.mark.local
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLUSTER": "a=http://127.0.0.1:1,b=http://127.0.0.1:2"}, "NODE_NAME"),
        (
            {"NODE_NAME": "c", "CLUSTER": "a=http://127.0.0.1:1,b=http://127.0.0.1:2"},
            "not in CLUSTER",
        ),
        (
            {"NODE_NAME": "a", "CLUSTER": "a=http://127.0.0.1:1,b=http://127.0.0.1:2"},
            "ETCD_ENDPOINTS",
        ),
        ({"NODE_NAME": "a", "CLUSTER": "a=http://127.0.0.1:1,b"}, "CLUSTER"),
        (
            {
                "NODE_NAME": "a",
                "CLUSTER": "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
                "ETCD_ENDPOINTS": "http://127.0.0.1:3",
                "WRITE_QUORUM": "2",
            },
            "WRITE_QUORUM",
        ),
        (
            {
                "NODE_NAME": "a",
                "CLUSTER": "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
                "ETCD_ENDPOINTS": "http://127.0.0.1:3",
                "LEASE_TTL_S": "1",
            },
            "LEASE_TTL_S",
        ),
    ],
)
def test_a_bad_configuration_stops_the_node_naming_the_variable(env: dict, message: str) -> None:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "CLUSTER", "WRITE_QUORUM")
    }
    done = subprocess.run(
        [sys.executable, "-m", "kv.ha"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


# -- 4 and 5. /primary, the status routes, and redirects ---------------------------------


async def test_one_primary_and_followers_redirect_writes_to_it(
    ha: HAControl, client: httpx.AsyncClient
) -> None:
    leader = ha.heal()
    leader_url = ha.url_of(leader)
    assert ha.primaries() == [leader]
    follower_name = next(name for name in ha.node_urls() if name != leader)
    follower_url = ha.url_of(follower_name)

    # The leader's URL as it is advertised (its URL in CLUSTER); under compose, an address
    # inside the compose network rather than the published port.
    advertised = (await client.get(f"{leader_url}/ha")).json()["url"]

    async def all_know_the_term() -> bool:
        """A follower learns the leader's term from its first batch or heartbeat."""
        for url in ha.urls:
            if (await client.get(f"{url}/health")).json()["term"] < 1:
                return False
        return True

    await eventually(all_know_the_term, 10, "every node knowing the leader's term")
    for url in ha.urls:
        info = (await client.get(f"{url}/")).json()
        health = (await client.get(f"{url}/health")).json()
        for body in (info, health):
            assert body["role"] == ("leader" if url == leader_url else "follower")
            assert body["leader_name"] == leader
            assert body["leader_url"] == advertised
            assert body["term"] >= 1
        metrics = (await client.get(f"{url}/metrics")).text
        assert f"kv_is_leader {1.0 if url == leader_url else 0.0}" in metrics
        assert f'kv_leader_info{{leader="{leader}"' in metrics
        assert "kv_lease_remaining_seconds" in metrics and "kv_leader_changes_total" in metrics
        assert 'kv_etcd_errors_total{op="keepalive"}' in metrics

    answer = await client.get(f"{follower_url}/primary")
    assert answer.status_code == 503 and answer.json()["leader_name"] == leader

    # POST, PUT and DELETE: 307 to the same path and query on the leader.
    for method, path, body in [
        ("POST", "/keys?w=2&timeout_ms=900", {"key": "a b/c?", "value": 1}),
        ("PUT", "/keys/a%20b%2Fc%3F?w=2", {"value": 2}),
        ("DELETE", "/keys/a%20b%2Fc%3F?if_version=0", None),
    ]:
        redirect = await client.request(method, f"{follower_url}{path}", json=body)
        assert redirect.status_code == 307, redirect.text
        assert redirect.headers["location"] == f"{advertised}{path}"

    if not ha.local:
        return  # the redirect names an address the host cannot reach: HAProxy's job there
    async with httpx.AsyncClient(timeout=10, trust_env=False, follow_redirects=True) as follows:
        written = await follows.put(f"{follower_url}/keys/via%20redirect", json={"value": "x"})
        assert written.status_code == 200, written.text
        assert written.json()["acks"] >= 3
        assert str(written.url).startswith(leader_url)
        deleted = await follows.delete(f"{follower_url}/keys/via%20redirect")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True


# -- 2, 6 and 7. SIGKILL under load; the merge; the old leader rejoins ---------------------


async def test_sigkill_of_the_leader_under_load_loses_no_acknowledged_write(
    ha: HAControl, client: httpx.AsyncClient
) -> None:
    old = ha.heal()
    old_url = ha.url_of(old)
    process = ha.member(old).process if isinstance(ha, HACluster) else None
    pgid = process.pid if process is not None else 0
    load = Load(ha, "kill")
    try:
        await load.acks_after(time.monotonic(), 30)
        before = max(a.version for a in load.log.acks)
        killed_at = time.monotonic()
        ha.kill(old)
        if pgid:
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)  # 2: nothing of the node is left running
        failover = await load.acks_after(killed_at, 30, not_from=old_url)
        new = ha.wait_for_primary(10)
        assert new != old
        print(f"\nfailover after SIGKILL: first acknowledged write {failover:.2f} s after the kill")
    finally:
        await load.finish()
    state = await state_of(client, ha.url_of(new))
    verdict = check(load.log, state["versions"])
    print(verdict)
    assert verdict.ok, verdict
    # 6: its first version is above every version an earlier leader assigned. (An answer the
    # old leader sent just before it died may be read after the kill: compare by term.)
    new_term = max(a.term for a in load.log.acks)
    earlier = [a.version for a in load.log.acks if a.term < new_term]
    newer = [a.version for a in load.log.acks if a.term == new_term]
    assert newer and min(newer) > max(earlier) >= before

    # 7: the old leader, restarted on its DATA_DIR, comes back as a follower, and all converge.
    ha.restart(old)
    await eventually(lambda: _follows(client, old_url, new), 30, f"{old} following {new}")
    assert ha.primaries() == [new]
    await eventually(lambda: converged(client, ha), 20, "all nodes converged")


async def _follows(client: httpx.AsyncClient, url: str, leader: str) -> bool:
    body = (await client.get(f"{url}/health")).json()
    return body["role"] == "follower" and body["leader_name"] == leader


# -- 3. no zombie leader ----------------------------------------------------------------------


async def test_a_leader_paused_past_its_lease_acknowledges_nothing_when_it_resumes(
    ha: HAControl, client: httpx.AsyncClient
) -> None:
    old = ha.heal()
    old_url = ha.url_of(old)
    ha.pause(old)
    try:
        new = ha.wait_for_primary(20, exclude=[old])
        written = await client.post(
            f"{ha.url_of(new)}/keys", json={"key": "after-pause", "value": 1}
        )
        assert written.status_code == 200, written.text
    finally:
        ha.resume(old)
    # Straight after SIGCONT, before its HA loop has run: writes sent to it directly.
    answers = await asyncio.gather(
        *(
            client.post(f"{old_url}/keys?w=1", json={"key": f"zombie-{i}", "value": i})
            for i in range(20)
        ),
        return_exceptions=True,
    )
    codes = [a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers]
    assert 200 not in codes, codes
    await eventually(lambda: _follows(client, old_url, new), 10, f"{old} following {new}")
    assert ha.primaries() == [new]
    for i in range(20):
        held = await client.get(f"{ha.url_of(new)}/keys/zombie-{i}")
        assert held.status_code == 404


# -- graceful hand-over ---------------------------------------------------------------------


async def test_sigterm_hands_leadership_over_without_waiting_for_the_lease(
    ha: HAControl, client: httpx.AsyncClient
) -> None:
    old = ha.heal()
    load = Load(ha, "term")
    try:
        await load.acks_after(time.monotonic(), 10)
        stopped_at = time.monotonic()
        ha.terminate(old)
        handover = await load.acks_after(stopped_at, 5, not_from=ha.url_of(old))
        print(f"\nhand-over after SIGTERM: first acknowledged write {handover:.2f} s after it")
        # Without a hand-over the lease alone takes 2 s or more to expire.
        assert handover < 2.0
    finally:
        await load.finish()
    new = ha.wait_for_primary(10)
    verdict = check(load.log, (await state_of(client, ha.url_of(new)))["versions"])
    assert verdict.ok, verdict
    ha.wait_stopped(old)


# -- 9. the best candidate first ------------------------------------------------------------


async def test_a_lagging_follower_does_not_win_over_a_current_one(
    ha: HAControl, client: httpx.AsyncClient
) -> None:
    old = ha.heal()
    lagging = next(name for name in ha.node_urls() if name != old)
    leader_url = ha.url_of(old)
    ha.pause(lagging)
    try:
        for i in range(20):
            response = await client.post(f"{leader_url}/keys", json={"key": f"lag-{i}", "value": i})
            assert response.status_code == 200
    finally:
        ha.kill(old)
        ha.resume(lagging)
    new = ha.wait_for_primary(20, exclude=[old])
    assert new != lagging
    status = (await client.get(f"{ha.url_of(new)}/ha")).json()
    assert status["is_leader"] is True


# -- 8. etcd unreachable -------------------------------------------------------------------


async def test_when_etcd_dies_the_leader_steps_down_and_reads_go_on(
    ha: HAControl, client: httpx.AsyncClient
) -> None:
    leader = ha.heal()
    leader_url = ha.url_of(leader)
    assert (
        await client.post(f"{leader_url}/keys", json={"key": "etcd", "value": 1})
    ).status_code == 200
    ha.kill_etcd()
    try:

        async def refused() -> bool:
            answer = await client.post(f"{leader_url}/keys", json={"key": "etcd", "value": 2})
            return answer.status_code == 503 and "cannot reach etcd at" in answer.json()["error"]

        took = await eventually(refused, 5, "writes refused with 'cannot reach etcd at'")
        print(f"\nthe leader stopped acknowledging {took:.2f} s after etcd died")
        assert ha.primaries() == []
        for url in ha.urls:
            read = await client.get(f"{url}/keys/etcd")
            # 2 if the write refused at its answer (the lease ran out while it waited) was
            # applied and replicated before: a 503 says it may or may not survive.
            assert read.status_code == 200 and read.json()["value"] in (1, 2)
    finally:
        ha.start_etcd()
    again = ha.wait_for_primary(30)
    written = await client.post(f"{ha.url_of(again)}/keys", json={"key": "etcd", "value": 3})
    assert written.status_code == 200, written.text


@pytest.mark.local
async def test_campaigns_at_the_same_instant_elect_one_leader_each_in_a_term_of_its_own(
    tmp_path: Path,
) -> None:
    etcd = PrivateEtcd(tmp_path / "etcd").start()
    nodes = [Etcd([etcd.url], "/race", f"n{i}") for i in range(4)]
    try:
        terms = []
        for _ in range(10):
            view = await nodes[0].read()
            leases = [(await node.grant(2))[0] for node in nodes]
            won = await asyncio.gather(
                *(
                    node.campaign(f"http://127.0.0.1:{i}", lease, view, 0)
                    for i, (node, lease) in enumerate(zip(nodes, leases, strict=True))
                )
            )
            winners = [record for record in won if record is not None]
            assert len(winners) == 1, won
            terms.append(winners[0].term)
            current = await nodes[1].read()
            assert current.leader == winners[0]
            for node, lease in zip(nodes, leases, strict=True):
                await node.revoke(lease)
            assert (await nodes[2].read()).leader is None
        assert terms == sorted(set(terms)) and terms[0] == 1
        assert isinstance(await nodes[3].read(), ClusterView)
    finally:
        for node in nodes:
            await node.aclose()
        etcd.stop()


@pytest.mark.local
async def test_a_node_with_priority_zero_never_leads_and_503_says_an_election_is_under_way(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    zero = {"FAILOVER_PRIORITY": "0"}
    cluster = start(tmp_path, nodes=3, quorum=1, node_env={"node2": zero, "node3": zero})
    try:
        assert cluster.wait_for_primary(20) == "node1"
        cluster.kill("node1")
        follower = cluster.member("node2").url

        async def no_leader() -> bool:
            answer = await client.post(f"{follower}/keys", json={"key": "k", "value": 1})
            return answer.status_code == 503

        await eventually(no_leader, 10, "503 once the leader's lease expired")
        answer = await client.post(f"{follower}/keys", json={"key": "k", "value": 1})
        assert answer.headers["retry-after"] == "1"
        assert "election is under way" in answer.json()["error"]
        await asyncio.sleep(1.0)  # two more HA cycles: still nobody campaigns
        assert cluster.primaries() == []
        cluster.restart("node1")
        assert cluster.wait_for_primary(20) == "node1"
    finally:
        cluster.stop()
