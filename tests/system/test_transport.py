"""KeepAliveTransport against real sockets: a real follower process and a scripted server."""

import asyncio
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from kv.network.delivery import describe
from kv.network.transport import KeepAliveTransport
from kv.settings import DEVELOPMENT_SECRET
from kv.web.auth import SECRET_HEADER
from tools.cluster import Node, free_port, wait_healthy

BATCH = b'{"entries":[{"key":"k","value":1,"version":1,"deleted":false}]}'


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[Node]:
    node = Node("follower", free_port(), {}, tmp_path / "follower.log")
    node.start()
    try:
        wait_healthy([node.url], 30, [node.process] if node.process else [])
        yield node
    finally:
        node.stop()


def client_for(url: str, **kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        transport=KeepAliveTransport(2),
        headers={SECRET_HEADER: DEVELOPMENT_SECRET, "content-type": "application/json"},
        **kwargs,
    )


async def test_requests_and_keep_alive(follower: Node):
    async with client_for(follower.url) as client:
        responses = [await client.post("/replicate", content=BATCH) for _ in range(20)]
        assert [r.status_code for r in responses] == [200] * 20
        assert responses[0].json()["applied"] == 1 and responses[-1].json()["stale"] == 1
        missing = await client.get("/keys/nope")
        assert missing.status_code == 404 and "nope" in missing.json()["error"]
        # Concurrent requests beyond the pool size wait for a connection, then succeed.
        many = await asyncio.gather(*(client.get("/health") for _ in range(10)))
        assert {r.status_code for r in many} == {200}


async def test_refused_connection_is_an_httpx_connect_error():
    async with client_for(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(httpx.ConnectError) as raised:
            await client.get("/health")
    assert describe(raised.value) == "connection refused: is the follower running?"


async def test_a_frozen_peer_is_a_read_timeout_and_the_connection_recovers(follower: Node):
    async with client_for(follower.url, timeout=httpx.Timeout(0.3)) as client:
        assert (await client.get("/health")).status_code == 200
        follower.signal(signal.SIGSTOP)
        try:
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/health")
        finally:
            follower.signal(signal.SIGCONT)
        assert (await client.get("/health")).status_code == 200


async def test_a_restarted_peer_is_reached_on_a_fresh_connection(follower: Node):
    async with client_for(follower.url) as client:
        assert (await client.get("/health")).status_code == 200
        follower.stop()
        follower.start()
        wait_healthy([follower.url], 30)
        # The pooled connection is dead; the transport retries once on a new one.
        assert (await client.get("/health")).status_code == 200


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> AsyncIterator[str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> None:
    while (await reader.readline()) not in (b"\r\n", b""):
        pass


async def test_chunked_responses_and_connection_close():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async for url in serve(handler):
        async with client_for(url) as client:
            for _ in range(3):  # each on a new connection, since the server closes it
                response = await client.get("/")
                assert (response.status_code, response.text) == (200, "hello world")


async def test_garbage_is_a_protocol_error():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-not-http\r\n\r\n")
        await writer.drain()
        writer.close()

    async for url in serve(handler):
        async with client_for(url) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")


async def test_a_name_that_stops_resolving_holds_at_most_one_lookup(monkeypatch):
    """A peer whose name hangs in the resolver (a removed container) gets one lookup at a
    time, however many heartbeats time out waiting for it: the resolver's few threads stay
    free for every other peer."""
    release = asyncio.Event()
    started = 0

    async def hanging_lookup(loop, host, port):
        nonlocal started
        started += 1
        await release.wait()
        raise OSError(f"{host}: Temporary failure in name resolution")

    monkeypatch.setattr("kv.network.transport._first_address", hanging_lookup)
    async with httpx.AsyncClient(
        base_url="http://gone.invalid:8000", transport=KeepAliveTransport(2)
    ) as client:
        for _ in range(5):
            with pytest.raises(httpx.ConnectTimeout):
                await client.post("/replicate", timeout=httpx.Timeout(1, connect=0.05))
        assert started == 1
        release.set()
        with pytest.raises(httpx.ConnectError, match="Temporary failure"):
            await client.post("/replicate", timeout=httpx.Timeout(1, connect=1))
        assert started == 1  # the failed lookup answered the waiter; the next one is new
        release.clear()
        with pytest.raises(httpx.ConnectTimeout):
            await client.post("/replicate", timeout=httpx.Timeout(1, connect=0.05))
        assert started == 2
        release.set()


async def test_tls_to_a_real_follower_and_a_silent_handshake_is_no_answer(tmp_path: Path):
    """https:// through the transport with the cluster's CA and a client certificate, and a
    peer that accepts TCP but never answers the handshake (a frozen process): a read
    timeout, "no answer", as over plain HTTP, not "no connection"."""
    from tools.certs import make_certs

    make_certs(tmp_path, ["follower1", "leader"])
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(tmp_path / "leader.pem", tmp_path / "leader-key.pem")
    node = Node(
        "follower",
        free_port(),
        {
            "TLS_CA_FILE": str(tmp_path / "ca.pem"),
            "TLS_CERT_FILE": str(tmp_path / "follower1.pem"),
            "TLS_KEY_FILE": str(tmp_path / "follower1-key.pem"),
        },
        tmp_path / "follower.log",
    )
    node.start()
    try:
        wait_healthy([node.url], 30, [node.process] if node.process else [], ca=node.ca)

        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=node.url,
                transport=KeepAliveTransport(2, context),
                headers={SECRET_HEADER: DEVELOPMENT_SECRET, "content-type": "application/json"},
                timeout=httpx.Timeout(0.3),
            )

        async with client() as working:
            assert (await working.post("/replicate", content=BATCH)).status_code == 200
        node.signal(signal.SIGSTOP)
        try:
            async with client() as fresh:  # no pooled connection: TCP, then the handshake
                with pytest.raises(httpx.ReadTimeout) as raised:
                    await fresh.get("/health")
            assert describe(raised.value, 0.3) == "no answer within 300 ms"
        finally:
            node.signal(signal.SIGCONT)
    finally:
        node.stop()
