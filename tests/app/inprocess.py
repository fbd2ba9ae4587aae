"""In-process clusters: real apps, with httpx's ASGITransport in place of sockets (no pytest here).

Used where a real socket adds nothing: validation, auth and the quorum logic.
The real-process tests live in test_integration.py.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI

import follower
import leader
from kv.settings import DEVELOPMENT_SECRET, FollowerSettings, LeaderSettings
from kv.web.auth import SECRET_HEADER
from tests.support import eventually

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


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
        await eventually(lambda: leader_started(leader_app), 10)
        try:
            yield InProcessCluster(leader_client, follower_clients, leader_app, follower_apps)
        finally:
            for client in follower_clients:
                await client.aclose()


async def leader_started(app: FastAPI) -> bool:
    """Its start-up read is done, so it takes writes (`/ready` also wants W followers up,
    which tests that make followers unreachable on purpose would never see)."""
    return bool(app.state.node.ready)


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
