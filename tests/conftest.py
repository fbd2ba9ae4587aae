"""In-process clusters: real apps, with httpx's ASGITransport in place of sockets.

Used where a real socket adds nothing: validation, auth and the quorum logic.
The real-process tests live in test_integration.py.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

import follower
import leader
from kv.settings import DEVELOPMENT_SECRET, FollowerSettings, LeaderSettings
from kv.web.auth import SECRET_HEADER

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def rss_bytes(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class InProcessCluster:
    leader: httpx.AsyncClient
    followers: list[httpx.AsyncClient]
    leader_app: FastAPI
    follower_apps: list[FastAPI] = field(default_factory=list)

    async def states(self) -> list[dict]:
        return [(await c.get("/state")).json() for c in [self.leader, *self.followers]]


def asgi_client(app: FastAPI, base_url: str, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url, **kwargs)


@asynccontextmanager
async def in_process_cluster(
    followers: int = 3,
    *,
    wrap: Callable[[int, FastAPI], httpx.AsyncBaseTransport] | None = None,
    **leader_settings,
) -> AsyncIterator[InProcessCluster]:
    """A leader whose follower clients reach follower apps in memory.

    `wrap(i, app)` may return a transport standing between the leader and
    follower i, to delay, gate or fail its deliveries.
    """
    follower_apps = [
        follower.create_app(FollowerSettings(leader_url="http://leader.test"))
        for _ in range(followers)
    ]
    urls = [f"http://follower{i}.test" for i in range(followers)]
    by_url = dict(zip(urls, range(followers), strict=True))

    def client_factory(url: str) -> httpx.AsyncClient:
        i = by_url[url]
        app = follower_apps[i]
        transport = wrap(i, app) if wrap else httpx.ASGITransport(app=app)
        return httpx.AsyncClient(
            transport=transport, base_url=url, headers={SECRET_HEADER: DEVELOPMENT_SECRET}
        )

    settings = LeaderSettings(
        followers=urls, **{"min_delay_ms": 0, "max_delay_ms": 0, **leader_settings}
    )
    leader_app = leader.create_app(settings, client_factory=client_factory)
    follower_clients = [asgi_client(app, url) for app, url in zip(follower_apps, urls, strict=True)]
    async with (
        leader_app.router.lifespan_context(leader_app),
        asgi_client(leader_app, "http://leader.test") as leader_client,
    ):
        await eventually(lambda: leader_is_ready(leader_client), 10)
        try:
            yield InProcessCluster(leader_client, follower_clients, leader_app, follower_apps)
        finally:
            for client in follower_clients:
                await client.aclose()


@pytest.fixture
async def cluster() -> AsyncIterator[InProcessCluster]:
    async with in_process_cluster() as c:
        yield c


async def leader_is_ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/ready")).status_code == 200


class ControlledTransport(httpx.AsyncBaseTransport):
    """Stands between the leader and one follower: passes, holds back or fails deliveries."""

    def __init__(self, app: FastAPI) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.failures_left = 0
        self.unreachable = False
        self.gate: asyncio.Event | None = None
        self.attempts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.unreachable or self.failures_left > 0:
            self.failures_left = max(0, self.failures_left - 1)
            raise httpx.ConnectError("simulated: follower unreachable", request=request)
        return await self.inner.handle_async_request(request)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `check` until it holds, or fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
