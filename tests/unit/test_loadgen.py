"""The benchmarks' load client opens only the connections its requests need (and, asked to,
opens them before a measurement), against a loopback server that counts them."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from tools.loadgen import ConnectionPool

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class CountingServer:
    def __init__(self) -> None:
        self.connections = 0
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[CountingServer]:
    counting = CountingServer()
    listening = await asyncio.start_server(counting.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    counting.url = f"http://127.0.0.1:{port}"
    async with listening:
        yield counting


async def test_sequential_requests_reuse_one_connection(server: CountingServer):
    async with ConnectionPool(server.url, 64) as pool:
        for i in range(50):
            assert (await pool.request("POST", "/keys", {"i": i})).status == 200
    assert server.connections == 1


async def test_concurrent_requests_open_only_what_they_need(server: CountingServer):
    async with ConnectionPool(server.url, 64) as pool:
        for _ in range(5):
            answers = await asyncio.gather(*(pool.request("GET", "/") for _ in range(4)))
            assert [a.status for a in answers] == [200] * 4
    assert server.connections == 4


async def test_warm_opens_connections_before_they_are_used(server: CountingServer):
    async with ConnectionPool(server.url, 64) as pool:
        await pool.warm(8)
        async with asyncio.timeout(5):  # the server counts each once it has accepted it
            while server.connections < 8:  # noqa: ASYNC110 (a counter, no event to wait on)
                await asyncio.sleep(0.01)
        await asyncio.gather(*(pool.request("GET", "/") for _ in range(8)))
    assert server.connections == 8
