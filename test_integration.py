"""The integration suite: real nodes, real HTTP.

By default it starts its own local cluster (a leader and five followers as
uvicorn processes on free loopback ports, delays 0..200 ms). Point it at a
running cluster instead with:

    KV_LEADER_URL=http://127.0.0.1:8000 \\
    KV_FOLLOWER_URLS=http://127.0.0.1:8001,...,http://127.0.0.1:8005 \\
    python -m pytest test_integration.py

Against a docker compose stack, also name its project, so that the fault tests
can stop, start, pause and unpause follower containers:

    KV_COMPOSE_PROJECT=replicated-kv KV_LEADER_URL=... KV_FOLLOWER_URLS=... \
    python -m pytest test_integration.py

The fault tests need a way to stop and freeze followers. Against any other
cluster that this suite did not start they are skipped, saying why.
"""

import asyncio
import json
import os
import random
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support import Check, eventually
from tools.cluster import ClusterControl, ComposeCluster, LocalCluster, wait_healthy
from tools.loadgen import ConnectionPool

SECRET_HEADER = "X-Replication-Secret"


@dataclass
class Cluster:
    leader: str
    followers: list[str]
    control: ClusterControl | None
    secret: str
    max_delay_ms: float

    @property
    def nodes(self) -> list[str]:
        return [self.leader, *self.followers]

    def faults(self) -> ClusterControl:
        if self.control is None:
            pytest.skip("this cluster was not started by the suite, so it cannot inject faults")
        return self.control


def tls_context() -> ssl.SSLContext | bool:
    """For a TLS stack (docker-compose.tls.yml): KV_CACERT verifies the nodes, and
    KV_CLIENT_CERT and KV_CLIENT_KEY are presented to them (replication's mutual TLS)."""
    ca = os.environ.get("KV_CACERT")
    if not ca:
        return True
    context = ssl.create_default_context(cafile=ca)
    if os.environ.get("KV_CLIENT_CERT"):
        context.load_cert_chain(os.environ["KV_CLIENT_CERT"], os.environ.get("KV_CLIENT_KEY"))
    return context


TLS = tls_context()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    secret = os.environ.get("KV_REPLICATION_SECRET", "integration-" + uuid.uuid4().hex)
    leader_url = os.environ.get("KV_LEADER_URL")
    if leader_url:
        followers = [u for u in os.environ.get("KV_FOLLOWER_URLS", "").split(",") if u]
        ca = Path(os.environ["KV_CACERT"]) if os.environ.get("KV_CACERT") else None
        wait_healthy([leader_url], 60, path="/ready", ca=ca)  # a leader reads its followers
        info = httpx.get(f"{leader_url}/", timeout=10, trust_env=False, verify=TLS).json()
        secret = os.environ.get("KV_REPLICATION_SECRET", "dev-replication-secret")
        project = os.environ.get("KV_COMPOSE_PROJECT")
        control = ComposeCluster(project, leader_url, followers, ca=ca) if project else None
        yield Cluster(leader_url, followers, control, secret, info["config"]["max_delay_ms"])
        return
    with (
        tempfile.TemporaryDirectory(prefix="kv-integration-") as logs,
        LocalCluster(
            followers=5,
            quorum=3,
            min_delay_ms=0,
            max_delay_ms=200,
            base_port=0,
            secret=secret,
            log_dir=Path(logs),
            data_dir=Path(logs) / "data",
        ) as local,
    ):
        yield Cluster(local.leader_url, local.follower_urls, local, secret, 200)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False, verify=TLS) as c:
        yield c


def unique(prefix: str = "key") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def read_everywhere(client: httpx.AsyncClient, cluster: Cluster, key: str) -> list[dict]:
    path = "/keys/" + quote(key, safe="")
    responses = await asyncio.gather(*(client.get(node + path) for node in cluster.nodes))
    return [r.json() if r.status_code == 200 else {"status": r.status_code} for r in responses]


async def states(client: httpx.AsyncClient, cluster: Cluster) -> list[dict]:
    responses = await asyncio.gather(*(client.get(f"{node}/state") for node in cluster.nodes))
    return [r.json() for r in responses]


def converged_check(client: httpx.AsyncClient, cluster: Cluster) -> Check:
    async def check() -> bool:
        leader, *followers = await states(client, cluster)
        want = (leader["store"], leader["versions"], leader["last_version"])
        return all((f["store"], f["versions"], f["last_version"]) == want for f in followers)

    return check


def holds_check(client: httpx.AsyncClient, cluster: Cluster, key: str, version: int) -> Check:
    async def check() -> bool:
        found = await read_everywhere(client, cluster, key)
        return all(node.get("version") == version for node in found)

    return check


def convergence_deadline(cluster: Cluster) -> float:
    return cluster.max_delay_ms / 1000 + 10


# -- the basics -------------------------------------------------------------


async def test_every_node_is_healthy(client: httpx.AsyncClient, cluster: Cluster):
    leader = (await client.get(f"{cluster.leader}/health")).json()
    assert leader["status"] == "ok" and leader["role"] == "leader"
    assert leader["followers"] == len(cluster.followers)
    assert 0 <= leader["write_quorum"] <= len(cluster.followers)
    for url in cluster.followers:
        follower = (await client.get(f"{url}/health")).json()
        assert (follower["status"], follower["role"]) == ("ok", "follower")


async def test_write_is_read_back_on_every_node(client: httpx.AsyncClient, cluster: Cluster):
    key, n = unique(), len(cluster.followers)
    response = await client.post(f"{cluster.leader}/keys?w={n}", json={"key": key, "value": [1]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["acks"] == n and len(body["replication"]) == n
    for node in await read_everywhere(client, cluster, key):
        assert node == {"key": key, "value": [1], "version": body["version"]}


async def test_versions_strictly_increase(client: httpx.AsyncClient, cluster: Cluster):
    key = unique()
    versions = []
    for i in range(5):
        response = await client.post(f"{cluster.leader}/keys?w=1", json={"key": key, "value": i})
        versions.append(response.json()["version"])
    assert versions == sorted(set(versions))


async def test_quorum_write_reports_its_deliveries(client: httpx.AsyncClient, cluster: Cluster):
    leader_view = (await client.get(f"{cluster.leader}/")).json()["config"]["followers"]
    response = await client.post(f"{cluster.leader}/keys?w=3", json={"key": unique(), "value": 1})
    body = response.json()
    assert response.status_code == 200
    assert body["write_quorum"] == 3 and body["acks"] >= 3
    assert len(body["replication"]) == body["acks"]
    for delivery in body["replication"]:
        assert delivery["ok"] is True
        assert delivery["follower"] in leader_view
        assert 0 <= delivery["delay_ms"] <= cluster.max_delay_ms
        assert delivery["latency_ms"] >= delivery["delay_ms"]
    # The leader waits for the third-fastest follower, and not much longer.
    third = sorted(d["latency_ms"] for d in body["replication"])[2]
    assert body["latency_ms"] >= third


async def test_asynchronous_write_w0_returns_at_once_and_still_replicates(
    client: httpx.AsyncClient, cluster: Cluster
):
    key = unique()
    response = await client.post(f"{cluster.leader}/keys?w=0", json={"key": key, "value": "a"})
    body = response.json()
    assert response.status_code == 200 and body["write_quorum"] == 0
    await eventually(
        holds_check(client, cluster, key, body["version"]),
        convergence_deadline(cluster),
        "an asynchronous write reaching every follower",
    )


async def test_background_completion_after_an_early_return(
    client: httpx.AsyncClient, cluster: Cluster
):
    key = unique()
    response = await client.post(f"{cluster.leader}/keys?w=1", json={"key": key, "value": 1})
    body = response.json()
    assert response.status_code == 200 and body["acks"] >= 1
    await eventually(
        holds_check(client, cluster, key, body["version"]),
        convergence_deadline(cluster),
        "the deliveries left running after the response completing",
    )


@pytest.mark.parametrize(
    "key", ["with space", "ünïcødé ключ", "a/b/../c", "what?x=1", "100%", "#frag", "%41", "&"]
)
async def test_url_encoded_keys(client: httpx.AsyncClient, cluster: Cluster, key: str):
    key = f"{key} {uuid.uuid4().hex[:6]}"
    path = "/keys/" + quote(key, safe="")
    n = len(cluster.followers)
    created = await client.post(f"{cluster.leader}/keys?w={n}", json={"key": key, "value": 1})
    assert created.status_code == 200
    for node in cluster.nodes:
        assert (await client.get(node + path)).json()["key"] == key
    updated = await client.put(f"{cluster.leader}{path}?w={n}", json={"value": 2})
    assert updated.status_code == 200 and updated.json()["key"] == key
    assert (await client.get(cluster.followers[-1] + path)).json()["value"] == 2
    deleted = await client.delete(f"{cluster.leader}{path}?w={n}")
    assert deleted.status_code == 200 and deleted.json()["version"] > updated.json()["version"]
    for node in cluster.nodes:
        assert (await client.get(node + path)).status_code == 404
        assert key not in (await client.get(f"{node}/keys")).json()["keys"]


async def test_delete_is_replicated_and_missing_keys_are_404(
    client: httpx.AsyncClient, cluster: Cluster
):
    key = unique()
    assert (await client.delete(f"{cluster.leader}/keys/{key}")).status_code == 404
    await client.post(f"{cluster.leader}/keys?w=0", json={"key": key, "value": 1})
    response = await client.delete(f"{cluster.leader}/keys/{key}?w=2")
    assert response.status_code == 200
    assert response.json()["acks"] >= 2 and response.json()["deleted"] is True
    for node in cluster.nodes:
        await eventually(
            absent_check(client, f"{node}/keys/{key}"),
            convergence_deadline(cluster),
            f"{node} dropping a deleted key",
        )


def absent_check(client: httpx.AsyncClient, url: str) -> Check:
    async def check() -> bool:
        return (await client.get(url)).status_code == 404

    return check


# -- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"key": "k", "value": ', 422),
        (b'{"value": 1}', 422),
        (b'{"key": "k"}', 422),
        (b'{"key": "", "value": 1}', 422),
        (b'{"key": 42, "value": 1}', 422),
        (json.dumps({"key": "x" * 1025, "value": 1}).encode(), 422),
        (json.dumps({"key": "big", "value": "x" * (1024 * 1024)}).encode(), 413),
    ],
    ids=["malformed", "no-key", "no-value", "empty-key", "int-key", "long-key", "huge-value"],
)
async def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    client: httpx.AsyncClient, cluster: Cluster, body: bytes, status: int
):
    before = (await client.get(f"{cluster.leader}/state")).json()["last_version"]
    response = await client.post(
        f"{cluster.leader}/keys", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.json()["error"]
    after = (await client.get(f"{cluster.leader}/state")).json()["last_version"]
    assert after == before


@pytest.mark.parametrize("query", ["w=-1", "w=99", "timeout_ms=0"])
async def test_out_of_range_parameters_are_422(
    client: httpx.AsyncClient, cluster: Cluster, query: str
):
    response = await client.post(f"{cluster.leader}/keys?{query}", json={"key": "k", "value": 1})
    assert response.status_code == 422


async def test_followers_refuse_writes(client: httpx.AsyncClient, cluster: Cluster):
    key = unique()
    for url in cluster.followers:
        for response in [
            await client.post(f"{url}/keys", json={"key": key, "value": 1}),
            await client.put(f"{url}/keys/{key}", json={"value": 1}),
            await client.delete(f"{url}/keys/{key}"),
        ]:
            assert response.status_code == 403
            assert "LEADER_URL" in response.json()["error"]
        assert (await client.get(f"{url}/keys/{key}")).status_code == 404


async def test_replicate_requires_the_secret(client: httpx.AsyncClient, cluster: Cluster):
    key = unique()
    entry = {"entries": [{"key": key, "value": "forged", "version": 10**12, "deleted": False}]}
    follower = cluster.followers[0]
    for headers in [{}, {SECRET_HEADER: "wrong"}, {SECRET_HEADER: cluster.secret + "x"}]:
        response = await client.post(f"{follower}/replicate", json=entry, headers=headers)
        assert response.status_code == 401
    assert (await client.get(f"{follower}/keys/{key}")).status_code == 404
    info = await client.get(f"{follower}/")
    assert cluster.secret not in info.text


# -- concurrency ----------------------------------------------------------------


async def test_concurrent_writes_and_deletes_on_few_keys_converge(
    client: httpx.AsyncClient, cluster: Cluster
):
    keys = [unique("hot") for _ in range(3)]
    rng = random.Random(2)
    limit = asyncio.Semaphore(20)
    statuses: list[int] = []

    async def operation(i: int) -> None:
        key = rng.choice(keys)
        w = rng.choice([0, 1, 3])
        async with limit:
            if rng.random() < 0.25:
                response = await client.delete(f"{cluster.leader}/keys/{key}?w={w}")
            else:
                response = await client.post(
                    f"{cluster.leader}/keys?w={w}", json={"key": key, "value": i}
                )
        statuses.append(response.status_code)

    await asyncio.wait_for(asyncio.gather(*(operation(i) for i in range(300))), timeout=60)
    assert set(statuses) <= {200, 404}
    assert statuses.count(200) > 200
    took = await eventually(
        converged_check(client, cluster), convergence_deadline(cluster), "replicas converging"
    )
    print(f"converged {took:.2f} s after the last write")


# -- consistency you can choose: read-your-writes, compare-and-set, the change feed -----


async def test_read_your_writes_on_every_follower_with_min_version(
    client: httpx.AsyncClient, cluster: Cluster
):
    key = unique("ryw")
    written = await client.post(f"{cluster.leader}/keys?w=1", json={"key": key, "value": "new"})
    assert written.status_code == 200
    version = written.json()["version"]
    assert written.headers["etag"] == f'"{version}"'
    path = "/keys/" + quote(key, safe="")
    for i, follower in enumerate(cluster.followers):
        # Half by query, half by header: the two spellings of the same thing.
        if i % 2:
            read = await client.get(
                f"{follower}{path}?wait_ms=5000", headers={"X-Min-Version": str(version)}
            )
        else:
            read = await client.get(f"{follower}{path}?min_version={version}&wait_ms=5000")
        assert read.status_code == 200, read.text
        assert read.json() == {"key": key, "value": "new", "version": version}
        assert read.headers["etag"] == f'"{version}"'
        assert int(read.headers["x-last-version"]) >= 0


async def test_a_version_not_yet_applied_is_a_503_saying_how_far_the_node_has_got(
    client: httpx.AsyncClient, cluster: Cluster
):
    info = (await client.get(f"{cluster.leader}/state")).json()
    future = info["last_version"] + 10**12  # no node will have applied this
    follower = cluster.followers[0]
    started = time.monotonic()
    response = await client.get(f"{follower}/keys?min_version={future}&wait_ms=200")
    waited = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["min_version"] == future and body["last_version"] >= 0
    assert body["leader"], "a follower names the leader"
    assert "not yet" in body["error"]
    assert waited >= 0.2, "it waited wait_ms before giving up"
    too_long = await client.get(f"{follower}/keys?min_version=1&wait_ms=60000")
    assert too_long.status_code == 422


async def test_monotonic_reads_carry_x_last_version_from_node_to_node(
    client: httpx.AsyncClient, cluster: Cluster
):
    keys = [unique("mono") for _ in range(5)]
    for key in keys:
        response = await client.post(f"{cluster.leader}/keys?w=1", json={"key": key, "value": 1})
        assert response.status_code == 200
    last = 0
    for follower in [*cluster.followers, *cluster.followers]:
        read = await client.get(
            f"{follower}/keys?wait_ms=5000", headers={"X-Min-Version": str(last)}
        )
        assert read.status_code == 200, read.text
        seen = int(read.headers["x-last-version"])
        assert seen >= last, "never older than what the client has already seen"
        last = seen
    leader = await client.get(f"{cluster.leader}/keys")
    assert int(leader.headers["x-last-version"]) >= last


async def test_conditional_writes_are_compare_and_set(client: httpx.AsyncClient, cluster: Cluster):
    key = unique("cas")
    url = f"{cluster.leader}/keys/{quote(key, safe='')}"
    created = await client.put(f"{url}?if_version=0", json={"value": 1})
    assert created.status_code == 200
    version = created.json()["version"]
    again = await client.put(f"{url}?if_version=0", json={"value": 1})
    assert again.status_code == 412, "0 means only if absent"
    assert again.json()["current_version"] == version
    stale = await client.put(url, json={"value": 2}, headers={"If-Match": f'"{version - 1}"'})
    assert stale.status_code == 412 and stale.headers["etag"] == f'"{version}"'
    fresh = await client.put(url, json={"value": 2}, headers={"If-Match": f'"{version}"'})
    assert fresh.status_code == 200 and fresh.json()["value"] == 2
    assert (await client.get(url)).json()["value"] == 2, "the refused write changed nothing"
    wrong_delete = await client.delete(url, headers={"If-Match": f'"{version}"'})
    assert wrong_delete.status_code == 412
    deleted = await client.delete(url, headers={"If-Match": fresh.headers["etag"]})
    assert deleted.status_code == 200
    gone = await client.put(url, json={"value": 3}, headers={"If-Match": "*"})
    assert gone.status_code == 412, "* needs the key to exist"
    nonsense = await client.put(url, json={"value": 3}, headers={"If-Match": "yesterday"})
    assert nonsense.status_code == 422


async def test_concurrent_compare_and_set_increments_lose_nothing(
    client: httpx.AsyncClient, cluster: Cluster
):
    key = unique("counter")
    url = f"{cluster.leader}/keys/{quote(key, safe='')}"
    assert (await client.put(f"{url}?if_version=0&w=1", json={"value": 0})).status_code == 200
    workers, each = 6, 10
    conflicts = 0

    async def increment() -> None:
        nonlocal conflicts
        for _ in range(each):
            for _attempt in range(200):
                read = await client.get(url)
                body = read.json()
                response = await client.put(
                    f"{url}?w=1",
                    json={"value": body["value"] + 1},
                    headers={"If-Match": read.headers["etag"]},
                )
                if response.status_code == 200:
                    break
                assert response.status_code == 412, response.text
                conflicts += 1
            else:
                raise AssertionError("200 attempts without a successful compare-and-set")

    await asyncio.gather(*(increment() for _ in range(workers)))
    final = (await client.get(url)).json()
    assert final["value"] == workers * each
    print(f"{workers * each} increments by {workers} clients, {conflicts} retried after a 412")


async def sse_events(
    client: httpx.AsyncClient, url: str, count: int, timeout: float = 10, **kwargs
) -> list[dict]:
    """The first `count` events (comments skipped) of a Server-Sent Events stream."""
    events: list[dict] = []
    current: dict = {}
    async with asyncio.timeout(timeout), client.stream("GET", url, **kwargs) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line == "":
                if current:
                    events.append(current)
                    current = {}
                    if len(events) == count:
                        return events
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


async def test_the_change_feed_streams_in_version_order_and_resumes_without_gaps(
    client: httpx.AsyncClient, cluster: Cluster
):
    prefix = unique("feed") + "/"
    start = (await client.get(f"{cluster.leader}/state")).json()["last_version"]
    follower = cluster.followers[1]
    watched = asyncio.create_task(
        sse_events(client, f"{follower}/watch?since_version={start}&prefix={quote(prefix)}", 12)
    )
    await asyncio.sleep(0.2)
    versions = []
    for i in range(10):
        response = await client.post(
            f"{cluster.leader}/keys?w=1", json={"key": f"{prefix}{i % 4}", "value": i}
        )
        versions.append(response.json()["version"])
    for i in (1, 2):
        response = await client.delete(f"{cluster.leader}/keys/{quote(prefix + str(i), safe='')}")
        versions.append(response.json()["version"])
    events = await watched
    assert [int(e["id"]) for e in events] == versions, "every entry, in version order"
    assert [e["event"] for e in events] == ["put"] * 10 + ["delete"] * 2
    assert events[-1]["data"]["deleted"] is True and events[-1]["data"]["key"] == f"{prefix}2"
    # A client that stopped after the fifth event resumes with Last-Event-ID.
    resumed = await sse_events(
        client,
        f"{follower}/watch?prefix={quote(prefix)}",
        7,
        headers={"Last-Event-ID": events[4]["id"]},
    )
    assert [int(e["id"]) for e in resumed] == versions[5:]
    one_key = await sse_events(
        client, f"{cluster.leader}/watch?since_version={start}&key={quote(prefix + '3')}", 2
    )
    assert [e["data"]["value"] for e in one_key] == [3, 7]


# -- faults ---------------------------------------------------------------------


@pytest.fixture
def faults(cluster: Cluster) -> Iterator[ClusterControl]:
    """The cluster's fault injector; every follower runs again afterwards, whatever happened."""
    control = cluster.faults()
    yield control
    for index in range(len(cluster.followers)):
        control.resume_follower(index)
    control.ensure_running()


async def test_frozen_followers_make_writes_fail_with_503_then_recover(
    client: httpx.AsyncClient, cluster: Cluster, faults: ClusterControl
):
    frozen = [0, 1, 2]
    for index in frozen:
        faults.pause_follower(index)
    key = unique()
    started = time.monotonic()
    response = await client.post(
        f"{cluster.leader}/keys?w=3&timeout_ms=500", json={"key": key, "value": 1}
    )
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    body = response.json()
    assert body["acks"] <= 2 and body["write_quorum"] == 3
    assert f"{body['acks']} of 3" in body["error"]
    # The write stays applied on the leader.
    held = (await client.get(f"{cluster.leader}/keys/{key}")).json()
    assert held["version"] == body["version"]
    ok = await client.post(f"{cluster.leader}/keys?w=2", json={"key": key, "value": 2})
    assert ok.status_code == 200
    for index in frozen:
        faults.resume_follower(index)
    took = await eventually(
        holds_check(client, cluster, key, ok.json()["version"]),
        convergence_deadline(cluster),
        "thawed followers catching up",
    )
    await eventually(
        converged_check(client, cluster), convergence_deadline(cluster), "full convergence"
    )
    print(f"thawed followers converged in {took:.2f} s")


async def test_a_frozen_follower_is_seen_down_within_a_second_and_a_half_even_under_load(
    client: httpx.AsyncClient, cluster: Cluster, faults: ClusterControl
):
    """Heartbeats go out beside data batches with their own short timeout, so a follower
    that stops answering is `down` long before a stuck batch's timeout."""
    index = len(cluster.followers) - 1
    config = (await client.get(f"{cluster.leader}/")).json()["config"]
    timeout_ms = config["heartbeat_timeout_ms"]

    async def replica() -> dict:
        return (await client.get(f"{cluster.leader}/health")).json()["replicas"][index]

    async def state_is(state: str) -> bool:
        return (await replica())["state"] == state

    await eventually(lambda: state_is("up"), 10, "the follower up before the test")
    stop = asyncio.Event()

    async def load() -> int:
        """Writes at w=1 all along, so data batches to the frozen follower are on the wire."""
        written = 0
        while not stop.is_set() and written < 5_000:
            response = await client.post(
                f"{cluster.leader}/keys?w=1", json={"key": unique("load"), "value": written}
            )
            assert response.status_code == 200, response.text
            written += 1
        return written

    writer = asyncio.create_task(load())
    try:
        await asyncio.sleep(0.2)
        faults.pause_follower(index)
        took = await eventually(lambda: state_is("down"), 1.5, "the frozen follower seen down")
        assert (await replica())["last_error"] == f"no answer within {timeout_ms:g} ms"
        faults.resume_follower(index)
        back = await eventually(lambda: state_is("up"), 15, "the thawed follower up again")
    finally:
        faults.resume_follower(index)
        stop.set()
        written = await writer
    print(f"down {took:.2f} s after SIGSTOP, up {back:.2f} s after SIGCONT; {written} writes")


async def test_ready_is_503_while_fewer_than_w_followers_are_reachable(
    client: httpx.AsyncClient, cluster: Cluster, faults: ClusterControl
):
    info = (await client.get(f"{cluster.leader}/")).json()["config"]
    n, w = len(cluster.followers), info["write_quorum"]
    frozen = list(range(n - w + 1))  # leaves w - 1 reachable

    async def ready_status() -> int:
        return (await client.get(f"{cluster.leader}/ready")).status_code

    assert await ready_status() == 200
    try:
        for index in frozen:
            faults.pause_follower(index)
        await eventually(lambda: _is(ready_status, 503), 3, "/ready turning 503")
        body = (await client.get(f"{cluster.leader}/ready")).json()
        assert body["ready"] is False and body["reachable"] == w - 1
        assert f"only {w - 1} of {n} followers are reachable" in body["reason"]
        assert (await client.get(f"{cluster.leader}/health")).status_code == 200
    finally:
        for index in frozen:
            faults.resume_follower(index)
    await eventually(lambda: _is(ready_status, 200), 15, "/ready back to 200")


async def _is(probe, expected) -> bool:
    return await probe() == expected


async def test_killed_follower_fails_only_writes_that_need_it(
    client: httpx.AsyncClient, cluster: Cluster, faults: ClusterControl
):
    n = len(cluster.followers)
    faults.kill_follower(n - 1)
    # Wait for the leader's own verdict: a write sent before its next heartbeat would
    # race the failure detector, and the answer would depend on the machine's speed.
    await eventually(
        replica_state_check(client, cluster, n - 1, "down"), 5, "the killed follower seen down"
    )
    timeout_ms = cluster.max_delay_ms + 2000
    all_of_them = await client.post(
        f"{cluster.leader}/keys?w={n}&timeout_ms={timeout_ms:g}", json={"key": unique(), "value": 1}
    )
    assert all_of_them.status_code == 503
    refused = all_of_them.json()
    assert f"only {n - 1} of {n} followers are reachable" in refused["error"]
    # Waiting cannot make a down follower confirm, so the leader does not wait out the timeout.
    assert refused["latency_ms"] < timeout_ms
    assert refused["acks"] <= n - 1
    enough = await client.post(
        f"{cluster.leader}/keys?w={n - 1}", json={"key": unique(), "value": 1}
    )
    assert enough.status_code == 200
    assert enough.json()["acks"] >= n - 1
    faults.restart_follower(n - 1)
    took = await eventually(
        all_up_check(client, cluster), convergence_deadline(cluster), "the leader seeing it up"
    )
    print(f"the leader saw the restarted follower up after {took:.2f} s")
    key = unique()
    after = await client.post(f"{cluster.leader}/keys?w={n}", json={"key": key, "value": 1})
    assert after.status_code == 200, "a restarted follower receives new writes"
    assert (await client.get(f"{cluster.followers[-1]}/keys/{key}")).status_code == 200
    # It came back with an empty memory; the leader's resync gives it what it missed.
    missed = enough.json()
    await eventually(
        holds_check(client, cluster, missed["key"], missed["version"]),
        convergence_deadline(cluster),
        "the restarted follower catching up",
    )


def replica_state_check(
    client: httpx.AsyncClient, cluster: Cluster, index: int, state: str
) -> Check:
    async def check() -> bool:
        health = (await client.get(f"{cluster.leader}/health")).json()
        return health["replicas"][index]["state"] == state

    return check


def all_up_check(client: httpx.AsyncClient, cluster: Cluster) -> Check:
    async def check() -> bool:
        health = (await client.get(f"{cluster.leader}/health")).json()
        return all(replica["state"] == "up" for replica in health["replicas"])

    return check


# -- faults under load: nothing acknowledged is lost ------------------------------


@dataclass
class Load:
    """Writes at a fixed quorum on unique keys, recording every acknowledgement."""

    leader: str
    quorum: int
    acked: dict[str, int]  # key -> version of each 2xx
    failures: list[str]
    stop: asyncio.Event

    async def run(self, connections: int = 8) -> None:
        counter = 0

        async def writer(pool: ConnectionPool) -> None:
            nonlocal counter
            while not self.stop.is_set():
                counter += 1
                key = f"load-{uuid.uuid4().hex[:8]}-{counter}"
                try:
                    response = await pool.request(
                        "POST", f"/keys?w={self.quorum}", {"key": key, "value": counter}
                    )
                except (OSError, asyncio.IncompleteReadError) as error:
                    self.failures.append(f"{key}: {type(error).__name__}")
                    await asyncio.sleep(0.05)  # the leader is down: try again shortly
                    continue
                if response.status == 200:
                    self.acked[key] = response.json()["version"]
                else:
                    self.failures.append(f"{key}: {response.status}")

        async with ConnectionPool(self.leader, connections, TLS) as pool:
            await asyncio.gather(*(writer(pool) for _ in range(connections)))


def start_load(cluster: Cluster, quorum: int = 3) -> tuple[Load, asyncio.Task[None]]:
    load = Load(cluster.leader, quorum, {}, [], asyncio.Event())
    return load, asyncio.create_task(load.run())


async def wait_for_acks(load: Load, count: int, timeout: float = 30) -> None:
    await eventually(lambda: _at_least(load, count), timeout, f"{count} acknowledged writes")


async def _at_least(load: Load, count: int) -> bool:
    return len(load.acked) >= count


def holds_all_check(client: httpx.AsyncClient, url: str, acked: dict[str, int]) -> Check:
    """`url` holds every acknowledged write: the same version, or a newer one."""

    async def check() -> bool:
        versions = (await client.get(f"{url}/state")).json()["versions"]
        return all(versions.get(key, 0) >= version for key, version in acked.items())

    return check


async def test_killed_follower_under_load_loses_nothing_and_catches_up_from_empty(
    client: httpx.AsyncClient, cluster: Cluster, faults: ClusterControl
):
    victim = len(cluster.followers) - 1
    load, task = start_load(cluster, quorum=3)
    try:
        await wait_for_acks(load, 50)
        faults.kill_follower(victim)
        killed_at = len(load.acked)
        await wait_for_acks(load, killed_at + 100)
        faults.restart_follower(victim, fresh=True)  # back with an empty memory
        before_restart = dict(load.acked)
        took = await eventually(
            holds_all_check(client, cluster.followers[victim], before_restart),
            5 + cluster.max_delay_ms / 1000,
            "the emptied follower holding every acknowledged write, while writes continue",
        )
        await wait_for_acks(load, len(before_restart) + 50)
    finally:
        load.stop.set()
        await task
    assert load.failures == [], "with 4 of 5 followers up, no W=3 write fails"
    total = await eventually(
        converged_check(client, cluster), convergence_deadline(cluster), "full convergence"
    )
    print(
        f"follower caught up {took:.2f} s after it was reachable; {len(load.acked)} acknowledged "
        f"writes checked, full convergence {total:.2f} s after the load stopped"
    )
    assert await holds_all_check(client, cluster.followers[victim], load.acked)()


async def test_killed_leader_loses_no_acknowledged_write(
    client: httpx.AsyncClient, cluster: Cluster, faults: ClusterControl
):
    load, task = start_load(cluster, quorum=3)
    try:
        await wait_for_acks(load, 200)
        faults.kill_leader()
    finally:
        load.stop.set()
        await task
    acked = dict(load.acked)
    faults.restart_leader()
    restarted = time.monotonic()
    # Every write the leader acknowledged before dying is still readable from it.
    versions = (await client.get(f"{cluster.leader}/state")).json()["versions"]
    missing = {k: v for k, v in acked.items() if versions.get(k) != v}
    assert missing == {}, f"{len(missing)} acknowledged writes lost: {list(missing)[:5]}"
    # New writes get versions above any assigned before, and the followers apply them.
    n = len(cluster.followers)
    await eventually(all_up_check(client, cluster), convergence_deadline(cluster), "all up")
    response = await client.post(f"{cluster.leader}/keys?w={n}", json={"key": unique(), "value": 1})
    assert response.status_code == 200
    assert response.json()["version"] > max(acked.values())
    took = await eventually(
        converged_check(client, cluster), convergence_deadline(cluster), "convergence"
    )
    print(
        f"{len(acked)} acknowledged writes checked after the leader's restart; replicas "
        f"converged {time.monotonic() - restarted:.2f} s after it ({took:.2f} s of polling)"
    )


async def test_with_every_follower_down_writes_fail_fast_and_the_leader_answers(
    client: httpx.AsyncClient, cluster: Cluster, faults: ClusterControl
):
    for index in range(len(cluster.followers)):
        faults.kill_follower(index)
    await eventually(all_down_check(client, cluster), 10, "the leader seeing every follower down")
    for _ in range(5):
        started = time.monotonic()
        response = await client.post(
            f"{cluster.leader}/keys?w=1", json={"key": unique(), "value": 1}
        )
        assert time.monotonic() - started < 1, "no waiting for the replication timeout"
        assert response.status_code == 503
        assert "only 0 of" in response.json()["error"]
    started = time.monotonic()
    assert (await client.get(f"{cluster.leader}/health")).status_code == 200
    assert (await client.get(f"{cluster.leader}/state")).status_code == 200
    assert time.monotonic() - started < 1
    asynchronous = await client.post(
        f"{cluster.leader}/keys?w=0", json={"key": unique(), "value": 2}
    )
    assert asynchronous.status_code == 200
    for index in range(len(cluster.followers)):
        faults.restart_follower(index)
    took = await eventually(
        converged_check(client, cluster), convergence_deadline(cluster), "convergence"
    )
    print(f"replicas converged {took:.2f} s after the followers came back")


def all_down_check(client: httpx.AsyncClient, cluster: Cluster) -> Check:
    async def check() -> bool:
        health = (await client.get(f"{cluster.leader}/health")).json()
        return all(replica["state"] == "down" for replica in health["replicas"])

    return check
