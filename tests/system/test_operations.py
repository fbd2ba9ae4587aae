"""Operating a real cluster: /metrics (scraped by a real Prometheus), logs that name their
node, counters that mean what they say, offline /docs, and a follower's helpful 404."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import eventually
from tools.cluster import ROOT, LocalCluster, free_port, spawn, stop_process

PROMETHEUS_CONFIG = ROOT / "monitoring" / "prometheus.yml"
WRITES = 40


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with (
        tempfile.TemporaryDirectory(prefix="kv-operations-") as logs,
        LocalCluster(
            followers=3,
            quorum=2,
            max_delay_ms=20,
            base_port=0,
            log_dir=Path(logs),
            extra_env={"LOG_FORMAT": "json", "ACCESS_LOG": "on"},
        ) as local,
    ):
        yield local


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=10, trust_env=False) as c:
        yield c


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


async def test_metrics_on_every_node_count_what_happened(client, cluster: LocalCluster):
    leader = cluster.leader_url
    for i in range(WRITES):
        response = await client.post(f"{leader}/keys?w=2", json={"key": f"m{i}", "value": i})
        assert response.status_code == 200
    written = (await client.post(f"{leader}/keys?w=3", json={"key": "last", "value": 1})).json()

    async def followers_caught_up() -> bool:
        health = (await client.get(f"{leader}/health")).json()
        return all(r["lag"] == 0 and r["state"] == "up" for r in health["replicas"])

    await eventually(followers_caught_up, 10, "followers caught up")
    response = await client.get(f"{leader}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    found = samples(response.text)
    assert value(found, "kv_writes_total", quorum="2") == WRITES
    assert value(found, "kv_write_latency_seconds_count", quorum="2") == WRITES
    assert value(found, "kv_write_latency_seconds_bucket", quorum="3", le="+Inf") == 1
    assert value(found, "kv_write_failures_total", reason="not_in_time") == 0
    assert value(found, "kv_last_version") == written["version"]
    assert value(found, "kv_ready") == 1
    for url in cluster.follower_urls:
        assert value(found, "kv_follower_state", follower=url, state="up") == 1
        assert value(found, "kv_follower_lag_versions", follower=url) == 0
        assert value(found, "kv_follower_pending_entries", follower=url) == 0
        assert value(found, "kv_follower_delivered_entries_total", follower=url) == WRITES + 1
        assert value(found, "kv_follower_resyncs_total", follower=url) == 0
        assert 0 < value(found, "kv_follower_heartbeat_rtt_seconds", follower=url) < 1
    for url in cluster.follower_urls:
        found = samples((await client.get(f"{url}/metrics")).text)
        assert value(found, "kv_applied_entries_total") == WRITES + 1
        assert value(found, "kv_last_version") == written["version"]
        assert (
            value(
                found,
                "kv_node_info",
                role="follower",
                node=f"follower{1 + cluster.follower_urls.index(url)}",
            )
            == 1
        )


async def test_a_starting_leaders_refusals_are_counted_by_reason(client, tmp_path: Path):
    with LocalCluster(followers=1, quorum=1, max_delay_ms=0, base_port=0) as small:
        small.pause_follower(0)
        try:
            small.restart_leader(wait_ready=False)
            refused = await client.post(f"{small.leader_url}/keys", json={"key": "k", "value": 1})
            assert refused.status_code == 503
            found = samples((await client.get(f"{small.leader_url}/metrics")).text)
            assert value(found, "kv_write_failures_total", reason="starting") == 1
            assert value(found, "kv_ready") == 0
        finally:
            small.resume_follower(0)


async def test_an_idle_clusters_counters_mean_what_they_say(client):
    """Heartbeats are not batches, and first contact is not a resync."""
    with LocalCluster(followers=2, quorum=1, max_delay_ms=0, base_port=0) as idle:

        async def heartbeats_seen() -> bool:
            health = (await client.get(f"{idle.leader_url}/health")).json()
            return all(r["heartbeats"] >= 2 for r in health["replicas"])

        await eventually(heartbeats_seen, 5, "two heartbeats to each follower")
        for replica in (await client.get(f"{idle.leader_url}/health")).json()["replicas"]:
            assert (replica["batches"], replica["delivered"], replica["resyncs"]) == (0, 0, 0)
            assert replica["state"] == "up" and replica["heartbeat_rtt_ms"] > 0


async def test_a_stopped_follower_is_down_with_connection_refused(client):
    with LocalCluster(followers=2, quorum=1, max_delay_ms=0, base_port=0) as small:
        small.kill_follower(1)

        async def seen_down() -> bool:
            replica = (await client.get(f"{small.leader_url}/health")).json()["replicas"][1]
            return replica["state"] == "down"

        await eventually(seen_down, 3, "the killed follower seen down")
        replica = (await client.get(f"{small.leader_url}/health")).json()["replicas"][1]
        assert replica["last_error"] == "connection refused: is the follower running?"


@pytest.fixture
def prometheus(cluster: LocalCluster, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus server on a free loopback port, scraping this cluster every second
    with the repository's monitoring/prometheus.yml, its targets pointed at this cluster."""
    if shutil.which("prometheus") is None:
        missing = (
            "Debian's prometheus package is not installed (apt-get install prometheus); "
            ".ci/run installs it"
        )
        if os.environ.get("CI"):
            pytest.fail(missing)  # in CI a skip here would hide a broken install
        pytest.skip(missing)
    if shutil.which("promtool"):
        subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG)], check=True)
    config = PROMETHEUS_CONFIG.read_text()
    ports = [url.rsplit(":", 1)[1] for url in (cluster.leader_url, *cluster.follower_urls)]
    for default, node_port in zip(range(8000, 8006), ports, strict=False):
        config = config.replace(f'"127.0.0.1:{default}"', f'"127.0.0.1:{node_port}"')
    config = config.replace(', "127.0.0.1:8004", "127.0.0.1:8005"', "")  # 3 followers here
    config = re.sub(r"scrape_interval: \S+", "scrape_interval: 1s", config)
    config = re.sub(r"scrape_timeout: \S+", "scrape_timeout: 1s", config)
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    process = spawn(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process, 10)


async def test_a_real_prometheus_scrapes_every_node(client, cluster: LocalCluster, prometheus):
    async def query(expr: str) -> list[dict]:
        try:
            response = await client.get(f"{prometheus}/api/v1/query", params={"query": expr})
        except httpx.TransportError:
            return []  # still starting
        return response.json()["data"]["result"] if response.status_code == 200 else []

    async def every_target_up() -> bool:
        up = await query("up")
        return len(up) == 4 and all(r["value"][1] == "1" for r in up)

    await eventually(every_target_up, 30, "Prometheus scraping all four nodes")
    await client.post(f"{cluster.leader_url}/keys?w=1", json={"key": "scraped", "value": 1})

    async def write_seen() -> bool:
        result = await query('sum(kv_writes_total{job="kv-leader"})')
        return bool(result) and float(result[0]["value"][1]) >= 1

    await eventually(write_seen, 15, "a write counted in Prometheus")
    assert len(await query('kv_follower_state{state="up"} == 1')) == 3
    assert len(await query("kv_applied_entries_total")) == 3


def test_json_logs_name_their_node_and_the_access_log_is_the_apps(cluster: LocalCluster):
    assert cluster.log_dir is not None
    for path in sorted(cluster.log_dir.glob("*.log")):
        node = path.stem  # leader, follower1, ...
        lines = path.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        assert records, f"{path.name} is empty"
        assert {record["node"] for record in records} == {node}
        warnings = [r for r in records if "development value" in r["message"]]
        assert len(warnings) == 1 and node in warnings[0]["message"]
        requests = [r["message"] for r in records if r["logger"] == "kvstore.access"]
        assert requests, f"ACCESS_LOG=on, yet {node} logged no request"
        assert not [r for r in records if r["logger"] == "uvicorn.access"]
        if node == "leader":
            assert any('"POST /keys" 200' in line for line in requests)


def test_text_logs_name_their_node_and_sampled_access_logs_stay_quiet(tmp_path: Path):
    with (
        LocalCluster(followers=1, quorum=1, max_delay_ms=0, base_port=0, log_dir=tmp_path) as c,
        httpx.Client(trust_env=False) as client,
    ):
        for i in range(20):
            assert client.post(f"{c.leader_url}/keys", json={"key": "k", "value": i}).is_success
    text = (tmp_path / "leader.log").read_text()
    assert "[leader] kvstore: REPLICATION_SECRET is the development value on leader" in text
    assert "kvstore.access" not in text, "sampled: every 100th request only"
    assert "[follower1]" in (tmp_path / "follower1.log").read_text()


async def test_docs_work_offline(client, cluster: LocalCluster):
    for url in (cluster.leader_url, cluster.follower_urls[0]):
        html = (await client.get(f"{url}/docs")).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(asset.startswith("/") for asset in assets), assets
        assert "cdn" not in html.lower()
        for asset in assets:
            response = await client.get(url + asset)
            assert response.status_code == 200 and len(response.content) > 100, asset
        assert (await client.get(f"{url}/openapi.json")).json()["openapi"].startswith("3.")


async def test_a_followers_404_says_how_far_it_has_got(client, cluster: LocalCluster):
    follower = cluster.follower_urls[0]
    state = (await client.get(f"{follower}/state")).json()
    response = await client.get(f"{follower}/keys/never-written")
    assert response.status_code == 404
    body = response.json()
    assert body["last_version"] == state["last_version"]
    assert "may not have it yet" in body["error"]
    leader = (await client.get(f"{cluster.leader_url}/keys/never-written")).json()
    assert "last_version" in leader and "follower" not in leader["error"]


async def test_a_watch_from_before_a_compacted_feed_says_so_then_sends_each_keys_newest(client):
    with LocalCluster(
        followers=1, quorum=1, max_delay_ms=0, base_port=0, extra_env={"CHANGE_FEED_ENTRIES": "3"}
    ) as small:
        versions = {}
        for i in range(8):
            key = f"k{i % 3}"
            response = await client.post(f"{small.leader_url}/keys", json={"key": key, "value": i})
            versions[key] = response.json()["version"]
        for node in (small.leader_url, small.follower_urls[0]):
            await eventually(
                lambda node=node: _applied_through(client, node, 8), 5, "the follower caught up"
            )
            lines: list[str] = []
            async with client.stream("GET", f"{node}/watch?since_version=1") as response:
                async for line in response.aiter_lines():
                    lines.append(line)
                    if sum(1 for x in lines if x.startswith("id: ")) == 3:
                        break
            assert "event: compacted" in lines
            notice = json.loads(lines[lines.index("event: compacted") + 1].removeprefix("data: "))
            assert notice["since_version"] == 1 and notice["compacted_through"] >= 2
            ids = [int(x.removeprefix("id: ")) for x in lines if x.startswith("id: ")]
            assert ids == sorted(versions.values()), "each key's newest, in version order"


async def _applied_through(client, node: str, version: int) -> bool:
    return (await client.get(f"{node}/state")).json()["applied_through"] >= version
