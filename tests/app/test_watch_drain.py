"""`GET /watch` when the node stops (kv/web/drain.py), in process: each open stream ends with
`event: shutdown`, a stream whose client takes nothing is cut at the deadline, and SIGTERM
reaches the drain through the handler it was chained in front of. The ASGI app is driven
directly, as uvicorn does: httpx's ASGITransport would wait for the end of the stream.
tests/system/test_watch_drain.py sends the real SIGTERM to real nodes."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import Message

from kv.core.changes import ChangeFeed
from kv.core.records import Entry
from kv.core.store import VersionedStore
from kv.web.consistency import VersionGate
from kv.web.drain import Drain
from kv.web.watch import watch_router

REASON = "the node is stopping (SIGTERM)"


@dataclass
class FeedNode:
    """What /watch reads of a node: its store, its change feed and its watermark."""

    store: VersionedStore = field(default_factory=VersionedStore)
    changes: ChangeFeed = field(default_factory=ChangeFeed)
    applied_through: int = 0
    term: int = 1
    leader_url: str | None = None
    gate: VersionGate = field(default_factory=VersionGate)

    def apply(self, key: str, version: int) -> None:
        self.applied_through = version
        self.changes.received([Entry.create(key, version, version)], version)


@dataclass
class Stream:
    """One GET /watch in progress: what the app has sent, and the call itself."""

    sent: asyncio.Queue[Message]
    call: asyncio.Task[None]
    blocked: asyncio.Event

    async def body(self, timeout: float = 2.0) -> bytes:
        """The next non-empty body chunk (b"" once the response is complete)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.sent.get()
                if message["type"] != "http.response.body":
                    continue
                if message.get("body") or not message.get("more_body", False):
                    return bytes(message.get("body", b""))


@asynccontextmanager
async def watching(
    app: FastAPI,
    query: bytes = b"",
    block_after: int | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
) -> AsyncIterator[Stream]:
    """GET /watch?`query` on `app`; past `block_after` body chunks, the client takes nothing
    more (its send never returns, as when a socket's buffers are full). `on_chunk` sees each
    non-empty body chunk as it is sent."""
    sent: asyncio.Queue[Message] = asyncio.Queue()
    blocked = asyncio.Event()
    chunks = 0

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client neither sends nor leaves
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body":
            chunks += 1
            if block_after is not None and chunks > block_after:
                blocked.set()
                await asyncio.Event().wait()
            if on_chunk is not None and message.get("body"):
                on_chunk(bytes(message["body"]))
        await sent.put(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/watch",
        "raw_path": b"/watch",
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"node.test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    call = asyncio.create_task(app(scope, receive, send))
    try:
        yield Stream(sent, call, blocked)
    finally:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)


def app_with(node: FeedNode, drain: Drain) -> FastAPI:
    app = FastAPI()
    app.include_router(watch_router(node, drain=drain))
    return app


def shutdown_data(chunk: bytes) -> dict[str, Any]:
    kind, data = chunk.decode().strip().split("\n")
    assert kind == "event: shutdown"
    assert data.startswith("data: ")
    return json.loads(data.removeprefix("data: "))  # type: ignore[no-any-return]


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """The process's SIGTERM and SIGINT handlers as they were, whatever a test chained."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


async def test_stopping_ends_an_open_stream_with_a_shutdown_event(signal_handlers: None) -> None:
    node, drain = FeedNode(), Drain()
    async with watching(app_with(node, drain)) as stream:
        assert await stream.body() == b": watching; each event's id is its version\n\n"
        node.apply("colour", 7)
        assert (await stream.body()).startswith(b"id: 7\nevent: put\n")
        drain.begin(REASON)
        data = shutdown_data(await stream.body())
        assert data["last_version"] == 7 and data["reason"] == REASON
        assert await stream.body() == b"", "the response must be complete"
        async with asyncio.timeout(1):
            await stream.call
    assert (drain.open, drain.cut, node.changes.subscribers) == (0, 0, 0)


async def test_a_stream_that_begins_while_the_node_stops_ends_at_once(
    signal_handlers: None,
) -> None:
    node, drain = FeedNode(), Drain()
    node.apply("colour", 3)
    drain.begin(REASON)
    async with watching(app_with(node, drain)) as stream:
        assert (await stream.body()).startswith(b": watching")
        assert shutdown_data(await stream.body())["last_version"] == 0
        assert await stream.body() == b""


async def test_a_stream_stops_in_its_catch_up_too(signal_handlers: None) -> None:
    node, drain = FeedNode(), Drain()
    for version in range(1, 101):
        node.apply(f"k{version}", version)
    chunks: list[bytes] = []

    def sent(chunk: bytes) -> None:
        chunks.append(chunk)
        if len(chunks) == 3:  # the comment, then entries 1 and 2 of the 100 replayed
            drain.begin(REASON)

    async with watching(app_with(node, drain), b"since_version=0", on_chunk=sent) as stream:
        async with asyncio.timeout(2):
            await stream.call
    assert len(chunks) == 4, "the catch-up must stop at once"
    assert shutdown_data(chunks[-1])["last_version"] == 2


async def test_a_client_that_takes_nothing_is_cut_at_the_deadline(
    signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    node, drain = FeedNode(), Drain(deadline_s=0.2)
    async with watching(app_with(node, drain), block_after=1) as stream:
        assert (await stream.body()).startswith(b": watching")
        node.apply("colour", 1)
        async with asyncio.timeout(2):
            await stream.blocked.wait()  # the put event is stuck in send
        loop = asyncio.get_running_loop()
        began = loop.time()
        drain.begin(REASON)
        async with asyncio.timeout(2):
            await stream.call  # returns: uvicorn then closes the connection
        took = loop.time() - began
    assert 0.2 <= took < 1.0, f"cut after {took:.3f} s, not at the 0.2 s deadline"
    assert (drain.cut, drain.open) == (1, 0)
    assert node.changes.subscribers == 0
    assert "cut 1 stream(s) whose client had not taken the final event" in caplog.text


async def test_sigterm_begins_the_drain_then_runs_the_handler_it_was_chained_to(
    signal_handlers: None,
) -> None:
    calls: list[int] = []

    def server_handler(signum: int, _: FrameType | None) -> None:  # uvicorn's, say
        calls.append(signum)

    signal.signal(signal.SIGTERM, server_handler)
    node, drain = FeedNode(), Drain()
    async with watching(app_with(node, drain)) as stream:
        assert (await stream.body()).startswith(b": watching")  # the drain is chained now
        signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        assert shutdown_data(await stream.body())["reason"] == REASON
        assert await stream.body() == b""
    assert drain.reason == REASON


async def test_nothing_is_chained_where_the_signal_keeps_its_default(
    signal_handlers: None,
) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no server: SIGTERM ends the process
    node, drain = FeedNode(), Drain()
    async with watching(app_with(node, drain)) as stream:
        assert (await stream.body()).startswith(b": watching")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class FakeTransport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


@dataclass
class FakeConnection:
    """What the drain reads of one of uvicorn's connections: its client and transport."""

    client: tuple[str, int]
    transport: FakeTransport = field(default_factory=FakeTransport)

    def __hash__(self) -> int:
        return id(self)


async def test_a_cut_stream_s_connection_is_dropped_and_no_other(
    signal_handlers: None,
) -> None:
    """asyncio closes a socket only once what it holds for it is written, which a client
    that reads nothing never lets happen, and uvicorn waits for every connection: the cut
    stream's connection (found by its client address) must be aborted."""
    server = uvicorn.Server(uvicorn.Config(FastAPI()))
    stuck, other = FakeConnection(("127.0.0.1", 50000)), FakeConnection(("127.0.0.1", 50001))
    server.server_state.connections.update({stuck, other})  # type: ignore[arg-type]
    signal.signal(signal.SIGTERM, server.handle_exit)
    node, drain = FeedNode(), Drain(deadline_s=0.1)
    async with watching(app_with(node, drain), block_after=1) as stream:  # client :50000
        assert (await stream.body()).startswith(b": watching")
        signal.raise_signal(signal.SIGTERM)  # the shutdown event is stuck in send
        async with asyncio.timeout(2):
            await stream.call
    assert server.should_exit, "uvicorn's own handler ran"
    assert drain.cut == 1
    assert stuck.transport.aborted and not other.transport.aborted
