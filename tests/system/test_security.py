"""The secret stays secret, and oversized bodies are refused while they are read."""

import socket
import time

import httpx
import pytest

from tests.support import rss_bytes
from tools.cluster import LocalCluster

SECRET = "s3cret-" + "q" * 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("logs")
    with LocalCluster(
        followers=2,
        max_delay_ms=0,
        base_port=0,
        secret=SECRET,
        extra_env={"LOG_LEVEL": "DEBUG"},
        log_dir=logs,
        data_dir=logs / "data",
    ) as running:
        yield running, logs


def test_the_secret_never_appears_in_responses_or_logs(cluster):
    running, logs = cluster
    with httpx.Client(timeout=10, trust_env=False) as client:
        client.post(f"{running.leader_url}/keys?w=2", json={"key": "k", "value": 1})
        seen = []
        for url in [running.leader_url, *running.follower_urls]:
            for path in ["/", "/health", "/openapi.json", "/keys/nope", "/replicate"]:
                seen.append(client.get(url + path).text)
            seen.append(client.post(url + "/replicate", json={"entries": []}).text)
            wrong = {"X-Replication-Secret": SECRET[:-1]}
            seen.append(client.post(url + "/replicate", json={"entries": []}, headers=wrong).text)
        seen.append(client.post(f"{running.leader_url}/keys", content=b"{").text)
    assert all(SECRET not in text for text in seen)
    for log in logs.glob("*.log"):
        assert SECRET not in log.read_text(), f"{log.name} leaks the secret"


@pytest.mark.parametrize("node", [0, 1])
def test_a_100_mb_body_is_refused_without_being_held_in_memory(cluster, node: int):
    running, _ = cluster
    target = running.nodes[node]
    assert target.process is not None
    path = "/keys" if node == 0 else "/replicate"
    before = rss_bytes(target.process.pid)
    status = send_huge_body(target.port, path, 100 * 1024 * 1024)
    grown = rss_bytes(target.process.pid) - before
    assert status in (413, None), f"got {status}"
    assert grown < 20 * 1024 * 1024, f"memory grew by {grown / 2**20:.0f} MiB"
    health = httpx.get(f"{target.url}/health", timeout=5, trust_env=False)
    assert health.status_code == 200


def test_a_chunked_body_is_cut_off_at_the_limit(cluster):
    running, _ = cluster
    leader = running.nodes[0]
    assert leader.process is not None
    before = rss_bytes(leader.process.pid)
    status = send_huge_body(leader.port, "/keys", 100 * 1024 * 1024, chunked=True)
    assert status in (413, None)
    assert rss_bytes(leader.process.pid) - before < 20 * 1024 * 1024


def test_the_413_names_the_limit(cluster):
    running, _ = cluster
    response = httpx.post(
        f"{running.leader_url}/keys",
        content=b'{"key": "k", "value": "' + b"x" * (3 * 1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
        trust_env=False,
    )
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


def send_huge_body(port: int, path: str, size: int, chunked: bool = False) -> int | None:
    """Stream `size` bytes of body; return the status, or None if the server hung up first."""
    chunk = b"x" * (1024 * 1024)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    if chunked:
        chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Replication-Secret: {SECRET}\r\n{framing}\r\n\r\n"
        )
        sock.sendall(head.encode())
        sent = 0
        deadline = time.monotonic() + 30
        try:
            while sent < size and time.monotonic() < deadline:
                sock.sendall(chunk)
                sent += 1024 * 1024
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return None
    if not reply:
        return None
    return int(reply.split(b" ", 2)[1])
