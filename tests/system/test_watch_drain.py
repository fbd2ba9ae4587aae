"""SIGTERM to real nodes with `GET /watch` streams open: each stream ends with
`event: shutdown`, and the node exits within a bound, even when a client never reads
(kv/web/drain.py cuts its stream at the deadline). Leader and follower run under uvicorn
as tools/cluster.py starts them; the HA node as `python -m kv.ha`, with a private etcd."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kv.web.drain import DEADLINE_S
from tests.support import eventually, require_etcd
from tools.cluster import HACluster, LocalCluster, Node

EXIT_BOUND_S = DEADLINE_S + 3.0
"""SIGTERM to exit: the drain's deadline, then uvicorn's own steps and the app's shutdown
(measured: 0.2 s with watchers that read, 2.05 s with one that never does)."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(
        followers=1, quorum=1, max_delay_ms=0, base_port=0, log_dir=tmp_path
    ) as started:
        yield started


class Watcher:
    """One client reading a node's /watch, event by event, until the stream ends."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.opened = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        timeout = httpx.Timeout(5.0, read=None)
        async with (
            httpx.AsyncClient(timeout=timeout, trust_env=False) as http,
            http.stream("GET", f"{self.url}/watch") as response,
        ):
            response.raise_for_status()
            async for kind, data in server_sent_events(response.aiter_lines()):
                if kind == "comment":
                    self.opened.set()
                else:
                    self.events.append((kind, json.loads(data)))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


async def server_sent_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) for each event, ("comment", text) for each comment line."""
    kind, data = "message", ""
    async for line in lines:
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif line == "" and data:
            yield kind, data
            kind, data = "message", ""


async def write(url: str, key: str, value: Any) -> int:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        answer = await http.post(f"{url}/keys?w=1", json={"key": key, "value": value})
    answer.raise_for_status()
    return int(answer.json()["version"])


async def terminate(node: Node, watcher: Watcher) -> tuple[float, float]:
    """SIGTERM `node`: the seconds until its watcher's stream ended, and until it exited."""
    assert node.process is not None
    process = node.process
    began = time.monotonic()
    node.signal(signal.SIGTERM)
    async with asyncio.timeout(EXIT_BOUND_S):
        await watcher.task  # the stream ends normally: an error would be raised here
    ended = time.monotonic() - began
    await asyncio.to_thread(process.wait, EXIT_BOUND_S)
    exited = time.monotonic() - began
    assert process.returncode in (0, -signal.SIGTERM), f"exit code {process.returncode}"
    return ended, exited


def assert_shutdown_last(watcher: Watcher, last_version: int) -> None:
    kind, data = watcher.events[-1]
    assert kind == "shutdown", f"the stream's events: {watcher.kinds()}"
    assert data["reason"] == "the node is stopping (SIGTERM)"
    assert data["last_version"] == last_version


async def test_sigterm_ends_each_watch_with_a_final_event_and_the_node_exits(
    cluster: LocalCluster,
) -> None:
    leader, follower = cluster.nodes[0], cluster.nodes[1]
    on_leader, on_follower = Watcher(leader.url), Watcher(follower.url)
    for watcher in (on_leader, on_follower):
        async with asyncio.timeout(5):
            await watcher.opened.wait()
    version = await write(leader.url, "colour", "blue")

    async def both_saw_it() -> bool:
        return all(w.kinds() == ["put"] for w in (on_leader, on_follower))

    await eventually(both_saw_it, 5, "the write on both streams")

    for name, node, watcher in (("follower", follower, on_follower), ("leader", leader, on_leader)):
        ended, exited = await terminate(node, watcher)
        print(f"\n{name}: stream ended {ended * 1000:.0f} ms after SIGTERM, exited at "
              f"{exited * 1000:.0f} ms")  # fmt: skip
        assert_shutdown_last(watcher, version)
        assert ended < DEADLINE_S, "a client that reads ends by the final event, not a cut"
        assert exited < EXIT_BOUND_S


async def test_a_client_that_never_reads_cannot_keep_the_node_from_exiting(
    cluster: LocalCluster,
) -> None:
    leader = cluster.nodes[0]
    assert leader.process is not None and leader.log_path is not None
    stuck = socket.socket()
    try:
        # A tiny receive window, and nothing read: the node's buffers for it fill up.
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(5)
        stuck.connect(("127.0.0.1", leader.port))
        stuck.sendall(b"GET /watch?prefix=big/ HTTP/1.1\r\nHost: kv\r\n\r\n")
        head = b""
        while b": watching" not in head:  # the stream is open; from here on, nothing is read
            chunk = stuck.recv(4096)
            assert chunk, f"the node closed the stream: {head!r}"
            head += chunk
        # More than the kernel's largest send buffer for one socket, and some: past that
        # uvicorn stops writing and the stream waits in send, where a final event cannot go.
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
        value = "x" * (512 * 1024)
        for i in range(math.ceil((wmem_max + 4 * 1024 * 1024) / len(value))):
            await write(leader.url, "big/value", f"{i}{value}")
        process = leader.process
        began = time.monotonic()
        leader.signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, EXIT_BOUND_S)
        exited = time.monotonic() - began
    finally:
        stuck.close()
    print(f"\nleader with a stuck /watch: exited {exited * 1000:.0f} ms after SIGTERM")
    assert exited < EXIT_BOUND_S
    assert "cut 1 stream(s) whose client had not taken the final event" in (
        leader.log_path.read_text()
    ), "the stream was not stuck, or was not cut at the deadline"


async def test_an_ha_node_ends_its_watch_streams_when_it_stops(tmp_path: Path) -> None:
    require_etcd()
    with HACluster(
        nodes=2, quorum=1, max_delay_ms=0, base_port=0, scratch=tmp_path, log_dir=tmp_path
    ) as ha:
        name = ha.wait_for_primary(30)
        member = ha.member(name)
        watcher = Watcher(member.url)
        async with asyncio.timeout(5):
            await watcher.opened.wait()
        version = await write(member.url, "colour", "green")
        await eventually(lambda: _saw(watcher, "put"), 5, "the write on the stream")
        assert member.process is not None
        process = member.process
        began = time.monotonic()
        ha.terminate(name)  # the whole process group, as an operator would
        async with asyncio.timeout(EXIT_BOUND_S):
            await watcher.task
        ended = time.monotonic() - began
        try:
            await asyncio.to_thread(process.wait, EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not exit within {EXIT_BOUND_S:g} s of SIGTERM")
        exited = time.monotonic() - began
        member.process = None
        print(f"\nHA leader {name}: stream ended {ended * 1000:.0f} ms after SIGTERM, "
              f"exited at {exited * 1000:.0f} ms")  # fmt: skip
        assert_shutdown_last(watcher, version)
        assert ended < DEADLINE_S


async def _saw(watcher: Watcher, kind: str) -> bool:
    return kind in watcher.kinds()
