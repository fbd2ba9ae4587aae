"""A lean keep-alive HTTP/1.1 client for load generation and latency measurement.

Measuring a store whose overhead is a few milliseconds needs a client that adds
less than that. httpx costs one to two milliseconds of CPU per request under
concurrency (encode/httpx#3215), on the same two cores as the cluster, which
would show up as "replication overhead" that is really the client's. This client
writes one request and reads one `Content-Length` response per connection at a
time, over plain asyncio streams: enough for the JSON API here, and cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kv.network.http1 import read_body, read_head


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else {}


class Connection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, payload: Any = None) -> Response:
        body = b"" if payload is None else json.dumps(payload).encode()
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        for attempt in (1, 2):
            await self.connect()
            assert self._writer is not None
            try:
                self._writer.write(head + body)
                return await self._read_response()
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server closed an idle keep-alive connection: reconnect once.
                await self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def connect(self) -> None:
        """Open the connection unless it is open."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.tls
            )

    async def _read_response(self) -> Response:
        assert self._reader is not None
        head = await read_head(self._reader)
        body = await read_body(self._reader, head)
        if not head.keep_alive:
            await self.close()
        return Response(head.status, body)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


class ConnectionPool:
    """At most `size` connections to one base URL, each used by one request at a time.
    An https:// URL is verified with `tls` (default: the system's CAs).

    The most recently used idle connection is used first, so the pool opens only as many
    connections as the requests in flight need, and those stay warm. Taken in turn instead,
    a pool of 512 opened 512 connections at the start of every measurement, and the server's
    cost of accepting them showed up as the store's latency (300 ms at p99)."""

    def __init__(self, base_url: str, size: int, tls: ssl.SSLContext | bool = True) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            raise ValueError(f"{base_url!r}: only http(s)://host:port URLs are supported")
        context = None
        if parts.scheme == "https":
            context = tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
        port = parts.port or (443 if context else 80)
        self._idle: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()
        self._all = [Connection(parts.hostname, port, context) for _ in range(size)]
        for connection in self._all:
            self._idle.put_nowait(connection)

    async def request(self, method: str, target: str, payload: Any = None) -> Response:
        connection = await self._idle.get()
        try:
            return await connection.request(method, target, payload)
        except BaseException:
            await connection.close()  # never reuse a connection left mid-response
            raise
        finally:
            self._idle.put_nowait(connection)

    async def warm(self, count: int) -> None:
        """Open `count` connections now (as a benchmark's load generator does before it
        measures), so that opening them is not timed as the server's latency."""
        idle = [self._idle.get_nowait() for _ in range(min(count, self._idle.qsize()))]
        try:
            await asyncio.gather(*(connection.connect() for connection in idle))
        finally:
            for connection in reversed(idle):
                self._idle.put_nowait(connection)

    async def close(self) -> None:
        for connection in self._all:
            await connection.close()

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def closed_loop(
    url: str, target: str, body: Callable[[int, int], Any], duration: float, in_flight: int
) -> float:
    """Writes/s with `in_flight` POSTs to `target` always outstanding for `duration` seconds:
    writer n's i-th request carries `body(n, i)`. Raises on an answer other than 200."""
    done = 0
    stop = time.monotonic() + duration
    async with ConnectionPool(url, in_flight) as pool:

        async def writer(n: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < stop:
                response = await pool.request("POST", target, body(n, i))
                if response.status != 200:
                    raise RuntimeError(f"write answered {response.status}: {response.body[:200]!r}")
                done += 1
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(writer(n) for n in range(in_flight)))
        return done / (time.monotonic() - started)
