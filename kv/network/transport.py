"""A lean HTTP/1.1 keep-alive transport for httpx, for the leader's replication traffic.

The leader talks to each follower through an ordinary `httpx.AsyncClient`; this
module only replaces what sits under it. httpx's default transport (httpcore on
anyio) costs about 640 µs of CPU per request on this project's machines
(encode/httpx#3215), and the leader's core pays that for every batch it ships:
with five followers, more than 3 ms of CPU per sequential write. This transport
writes the request and parses the response directly on asyncio streams (about
60 µs), which is enough for the one peer it talks to: a uvicorn follower that
answers every request with a `Content-Length` (chunked bodies are read too).

It honours httpx's timeouts and raises httpx's exceptions, so callers see the
same errors as with the default transport. A connection whose request fails or
is cancelled part-way is closed, never returned to the pool, so nothing is left
half-read for the next request.

A host name is resolved by one lookup at a time per transport. A lookup runs in the
event loop's resolver threads (four under uvloop) and cannot be cancelled: a timeout
abandons it but the thread waits on. A peer whose name stopped resolving (a removed
container: the lookup then waits on the upstream DNS for seconds) would otherwise get a
new lookup every heartbeat and soon hold every resolver thread, stalling connections to
every other peer too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from kv.network.http1 import read_body, read_head


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


@contextmanager
def _map_errors(request: httpx.Request, timeout: type[httpx.TimeoutException]) -> Iterator[None]:
    try:
        yield
    except TimeoutError as error:
        raise timeout(str(error) or timeout.__name__, request=request) from error
    except asyncio.IncompleteReadError as error:
        raise httpx.RemoteProtocolError(
            "connection closed mid-response", request=request
        ) from error
    except (ConnectionError, OSError) as error:
        raise httpx.ConnectError(str(error) or type(error).__name__, request=request) from error
    except ValueError as error:
        raise httpx.RemoteProtocolError(f"malformed response: {error}", request=request) from error


async def _first_address(loop: asyncio.AbstractEventLoop, host: str, port: int) -> str:
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no address")
    return str(infos[0][4][0])


def _consume(future: asyncio.Future[str]) -> None:
    """Mark a lookup's failure as seen: nobody may be waiting for it any more."""
    if not future.cancelled():
        future.exception()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """Up to `max_connections` keep-alive HTTP/1.1 connections to a single origin."""

    def __init__(self, max_connections: int = 2, ssl_context: ssl.SSLContext | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        # For https:// (kv/network/tls.py); None: the system's CAs, as httpx would.
        self._ssl: ssl.SSLContext | None = ssl_context
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False
        self._lookup: asyncio.Future[str] | None = None  # the one lookup in flight

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("transport is closed", request=request)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection", request=request) from None
        try:
            connection = self._idle.pop() if self._idle else None
            reused = connection is not None
            try:
                if connection is None:
                    connection = await self._connect(request, timeouts)
                try:
                    response = await self._exchange(connection, request, body, timeouts.get("read"))
                except (httpx.RemoteProtocolError, httpx.ConnectError):
                    if not reused:
                        raise
                    # The follower closed an idle connection (e.g. it restarted): one fresh try.
                    connection.close()
                    connection = await self._connect(request, timeouts)
                    response = await self._exchange(connection, request, body, timeouts.get("read"))
            except BaseException:
                if connection is not None:
                    connection.close()
                raise
            if response.headers.get("connection", "").lower() == "close" or self._closed:
                connection.close()
            else:
                self._idle.append(connection)
            return response
        finally:
            self._slots.release()

    async def _connect(
        self, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> _Connection:
        """TCP within the connect timeout; then, for https, the TLS handshake within the read
        timeout. The kernel completes a TCP connection to a frozen process, but only the
        process can answer a handshake: that is "no answer", as over plain HTTP."""
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        with _map_errors(request, httpx.ConnectTimeout):
            async with asyncio.timeout(timeouts.get("connect")):
                address = await self._resolve(url.host, port)
                reader, writer = await asyncio.open_connection(address, port)
        if url.scheme == "https":
            try:
                with _map_errors(request, httpx.ReadTimeout):
                    async with asyncio.timeout(timeouts.get("read")):
                        await writer.start_tls(self._ssl_context(), server_hostname=url.host)
            except BaseException:
                writer.close()
                raise
        return _Connection(reader, writer)

    def _ssl_context(self) -> ssl.SSLContext:
        if isinstance(self._ssl, ssl.SSLContext):
            return self._ssl
        self._ssl = ssl.create_default_context()
        return self._ssl

    async def _resolve(self, host: str, port: int) -> str:
        """The host's first address, by at most one lookup at a time (see the docstring)."""
        try:
            ipaddress.ip_address(host)
            return host  # a literal needs no lookup
        except ValueError:
            pass
        if self._lookup is None or self._lookup.done():
            loop = asyncio.get_running_loop()
            self._lookup = asyncio.ensure_future(_first_address(loop, host, port))
            self._lookup.add_done_callback(_consume)
        return await asyncio.shield(self._lookup)

    async def _exchange(
        self, connection: _Connection, request: httpx.Request, body: bytes, timeout: float | None
    ) -> httpx.Response:
        head = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1"]
        head += [f"{name}: {value}" for name, value in request.headers.items()]
        if "content-length" not in request.headers:
            head.append(f"Content-Length: {len(body)}")
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        with _map_errors(request, httpx.ReadTimeout):
            async with asyncio.timeout(timeout):
                connection.writer.write(payload)
                return await self._read_response(connection.reader, request)

    async def _read_response(
        self, reader: asyncio.StreamReader, request: httpx.Request
    ) -> httpx.Response:
        head = await read_head(reader)
        content = await read_body(reader, head)
        return httpx.Response(head.status, headers=head.headers, content=content, request=request)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
