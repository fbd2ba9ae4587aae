"""Holding up under abuse, against a real leader with AUTH_FILE set: a thousand idle or slow
connections, clients that never read their /watch stream, and floods of bad tokens.

What each measures is printed (pytest -s shows it); the bounds asserted are the issue's:
writes within 2x their normal p99, memory under a bound the settings set, and a bad token
costing the node no more CPU than bad JSON.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import rss_bytes
from tests.system.tokens import BAD_TOKEN, auth_cluster, bearer, token
from tools.cluster import HOST, LocalCluster

pytestmark = pytest.mark.timeout(240)

SLOW_CONNECTIONS = 1000
WRITES = 1000
"""Timed writes before, and again while, the slow connections are open (about 1.5 s each)."""
WATCH_MAX_PENDING = 1000
CHANGE_FEED_ENTRIES = 1000
FLOOR_MS = 2.0
"""A normal p99 under this counts as this: below it, the 2-core machine's scheduling noise."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    folder = tmp_path_factory.mktemp("abuse")
    with auth_cluster(
        folder,
        extra_env={
            "WATCH_MAX_PENDING": str(WATCH_MAX_PENDING),
            "CHANGE_FEED_ENTRIES": str(CHANGE_FEED_ENTRIES),
        },
    ) as running:
        yield running


def leader_pid(cluster: LocalCluster) -> int:
    process = cluster.nodes[0].process
    assert process is not None
    return process.pid


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def write_latencies_ms(url: str, count: int, prefix: str) -> list[float]:
    """`count` sequential writes through one keep-alive connection, each timed."""
    latencies = []
    with httpx.Client(timeout=10, trust_env=False, headers=bearer("readwrite")) as client:
        for i in range(count):
            started = time.perf_counter()
            answer = client.post(f"{url}/keys", json={"key": f"{prefix}{i}", "value": i})
            latencies.append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 200, answer.text
    return latencies


def raise_own_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, (
            f"this test needs {needed} open files; the hard limit is {hard} (ulimit -Hn)"
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_slow_connections(port: int, count: int) -> list[socket.socket]:
    """A third idle, a third sending headers slowly, a third sending a body slowly."""
    header = f"Authorization: Bearer {token('readwrite')}\r\n"
    starts = [
        b"",
        b"POST /keys HTTP/1.1\r\nHost: kv\r\n",
        (
            "POST /keys HTTP/1.1\r\nHost: kv\r\nContent-Type: application/json\r\n"
            f"{header}Content-Length: 100000\r\n\r\n" + '{"key": "slow", "value": "'
        ).encode(),
    ]
    sockets = []
    for i in range(count):
        sock = socket.create_connection((HOST, port), timeout=5)
        if starts[i % 3]:
            sock.sendall(starts[i % 3])
        sockets.append(sock)
    return sockets


def trickle(sockets: list[socket.socket]) -> int:
    """One more byte on each slow connection; how many the node has not closed."""
    alive = 0
    for i, sock in enumerate(sockets):
        if i % 3 == 0:
            alive += 1
            continue
        try:
            sock.sendall(b"X-Slow: 1\r\n" if i % 3 == 1 else b"x")
            alive += 1
        except OSError:
            pass
    return alive


def test_a_thousand_idle_or_slow_connections_do_not_slow_other_writes(cluster):
    raise_own_file_limit(SLOW_CONNECTIONS + 512)
    url, port = cluster.leader_url, cluster.nodes[0].port
    write_latencies_ms(url, 50, "warm/")
    # A thousand writes a side: the p99 is then the 10th slowest, so one pause of the shared
    # 2-core machine (it once made a p99 of 400 writes 4.3 ms against 1.8) cannot decide it.
    normal = p99(write_latencies_ms(url, WRITES, "normal/"))
    sockets = open_slow_connections(port, SLOW_CONNECTIONS)
    try:
        during = write_latencies_ms(url, WRITES // 2, "during-a/")
        alive = trickle(sockets)
        during += write_latencies_ms(url, WRITES // 2, "during-b/")
        under_abuse = p99(during)
    finally:
        for sock in sockets:
            sock.close()
    limit = 2 * max(normal, FLOOR_MS)
    print(
        f"\nwrite p99: {normal:.2f} ms normally, {under_abuse:.2f} ms with {SLOW_CONNECTIONS} "
        f"slow connections open ({alive} still open mid-way); limit {limit:.2f} ms"
    )
    assert alive > SLOW_CONNECTIONS // 2, "the slow connections were not held open"
    assert under_abuse <= limit


async def unread_watches(url: str, count: int) -> list[socket.socket]:
    """`count` /watch streams whose client reads nothing: small receive buffers, so the node
    soon cannot send and must hold or drop what it has not sent."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, int(url.rsplit(":", 1)[1])))
        sock.sendall(
            f"GET /watch HTTP/1.1\r\nHost: kv\r\nAuthorization: Bearer {token('read')}\r\n\r\n"
            .encode()
        )  # fmt: skip
        sockets.append(sock)
    return sockets


async def overwrite(url: str, key: str, value: str, count: int, concurrency: int = 16) -> None:
    async with httpx.AsyncClient(
        timeout=30, trust_env=False, headers=bearer("readwrite")
    ) as client:
        done = 0

        async def worker() -> None:
            nonlocal done
            while done < count:
                done += 1
                answer = await client.post(f"{url}/keys", json={"key": key, "value": value})
                assert answer.status_code == 200, answer.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def test_clients_that_never_read_their_watch_cannot_grow_memory_past_a_bound(cluster):
    url, pid = cluster.leader_url, leader_pid(cluster)
    value = "v" * 16384
    watchers, writes = 8, 6 * WATCH_MAX_PENDING
    # Fill the change feed first, so its own (bounded) growth is not counted.
    asyncio.run(overwrite(url, "watched", value, 2 * CHANGE_FEED_ENTRIES))
    before = rss_bytes(pid)
    sockets = asyncio.run(unread_watches(url, watchers))
    try:
        asyncio.run(overwrite(url, "watched", value, writes))
        grown = rss_bytes(pid) - before
        # Now read one of them: it was cut off, with the overflow event, not buffered on.
        sock = sockets[0]
        sock.settimeout(10)
        tail = b""  # only the end of what arrived: the stream is megabytes long
        deadline = time.monotonic() + 30
        while b"event: overflow" not in tail and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            tail = tail[-64:] + chunk
    finally:
        for sock in sockets:
            sock.close()
    # The watchers share each entry: unbounded, they would hold every write's value once.
    unbounded = writes * len(value)
    bound = WATCH_MAX_PENDING * (len(value) + 1024) + 16 * 2**20
    print(
        f"\n{watchers} unread watchers, {writes} writes of {len(value)} B: leader RSS grew "
        f"{grown / 2**20:.1f} MiB; bound {bound / 2**20:.0f} MiB; unbounded it would be "
        f"{unbounded / 2**20:.0f} MiB"
    )
    assert b"event: overflow" in tail, "the unread watcher was never cut off"
    assert grown < bound


async def flood(url: str, count: int, headers: dict[str, str], body: bytes) -> list[int]:
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:

        async def worker(share: int) -> None:
            for _ in range(share):
                answer = await client.post(
                    f"{url}/keys",
                    content=body,
                    headers={**headers, "content-type": "application/json"},
                )
                statuses.append(answer.status_code)

        await asyncio.gather(*(worker(count // 8) for _ in range(8)))
    return statuses


def test_ten_thousand_bad_tokens_cost_no_more_than_bad_json(cluster):
    url, pid = cluster.leader_url, leader_pid(cluster)
    count = 10_000
    bad_token = {"Authorization": f"Bearer {BAD_TOKEN}"}
    good_body = b'{"key": "k", "value": 1}'
    costs: dict[str, list[float]] = {"bad token": [], "bad JSON": []}
    for _ in range(2):  # alternated, so a noisy moment does not fall on one side only
        for name, headers, body in (
            ("bad token", bad_token, good_body),
            ("bad JSON", bearer("readwrite"), b'{"key": "k", "value": '),
        ):
            before = cpu_seconds(pid)
            statuses = asyncio.run(flood(url, count // 2, headers, body))
            costs[name].append(cpu_seconds(pid) - before)
            assert set(statuses) == {401 if name == "bad token" else 422}
    per_request = {name: sum(c) / count * 1e6 for name, c in costs.items()}
    print(
        f"\nleader CPU per request: bad token {per_request['bad token']:.0f} us, "
        f"bad JSON {per_request['bad JSON']:.0f} us"
    )
    assert per_request["bad token"] <= per_request["bad JSON"]
