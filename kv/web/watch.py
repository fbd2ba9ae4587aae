"""`GET /watch`: a node's change feed as Server-Sent Events, on any node.

Every entry applied after `since_version` (tombstones included), in version order, then
live ones as they are released (kv/core/changes.py). Each event's `id` is its version, so
a client that reconnects with `Last-Event-ID` (browsers do it by themselves) or
`?since_version=` resumes where it stopped and misses nothing. Events:

* `put` / `delete`: `data` is the entry, `{"key", "value", "version", "deleted"}`;
* `compacted`: the feed no longer reaches back to `since_version`; what follows is each
  key's newest entry above it (intermediate versions are gone), then the live feed;
* `overflow`: this client fell `WATCH_MAX_PENDING` entries behind and is cut off; reconnect
  with the last id received;
* `shutdown`: the node is stopping (SIGTERM), and the stream ends; reconnect, to another
  node or to this one once it is back, with the last id received. Ending the streams is
  what lets the node exit: a stream whose client takes not even this event within
  kv/web/drain.py's deadline is cut;
* a comment line every 15 s keeps idle connections open through proxies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from kv.core.access import Grant
from kv.core.records import Entry
from kv.core.store import VersionedStore
from kv.web.access import grant_of
from kv.web.consistency import LAST_VERSION_HEADER, ReadableNode
from kv.web.drain import Drain, DrainedStream

MAX_PENDING = 10_000
"""Entries buffered for one client before it is cut off: a slow reader never costs more."""
KEEPALIVE_S = 15.0
PAGE = 10_000

SinceVersion = Annotated[
    int | None,
    Query(
        ge=0,
        description="Stream entries applied after this version (default: only new ones). "
        "Last-Event-ID, sent by a reconnecting EventSource, counts if this is absent.",
    ),
]


def event(entry: Entry) -> bytes:
    kind = b"delete" if entry.deleted else b"put"
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (entry.version, kind, entry.encoded)


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    """A Server-Sent Event without an id: a notice on /watch, or a /ui/api/events update."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


class Subscription:
    """One client's queue of released entries, bounded: past `limit` it is cut off. None in
    the queue wakes its reader to see `stopping`: the node is stopping, end the stream."""

    def __init__(self, wanted: Filter, limit: int = MAX_PENDING) -> None:
        self.wanted = wanted
        self.limit = limit
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self.overflowed = False
        self.stopping: str | None = None

    def __call__(self, entry: Entry) -> None:
        if self.overflowed or not self.wanted(entry):
            return
        if self.queue.qsize() >= self.limit:
            self.overflowed = True
            return
        self.queue.put_nowait(entry)

    def stop(self, reason: str) -> None:
        """End the stream with a `shutdown` event giving `reason` (the drain calls this)."""
        self.stopping = reason
        self.queue.put_nowait(None)


class Filter:
    """The entries a watcher asked for (`key`, `prefix`) and its token may see (`grant`)."""

    def __init__(self, key: str | None, prefix: str | None, grant: Grant | None = None) -> None:
        self.key = key
        self.prefix = prefix
        self.grant = grant

    def __call__(self, entry: Entry) -> bool:
        if self.key is not None and entry.key != self.key:
            return False
        if self.grant is not None and not self.grant.covers(entry.key):
            return False
        return self.prefix is None or entry.key.startswith(self.prefix)


def compacted_catch_up(store: VersionedStore, after: int, through: int) -> Iterable[Entry]:
    """Each key's newest entry with a version in (after, through], in version order."""
    while True:
        page = store.page(after, PAGE)
        for entry in page:
            if entry.version > through:
                return
            yield entry
        if len(page) < PAGE:
            return
        after = page[-1].version


def catch_up_from(
    node: ReadableNode, since: int | None, wanted: Filter
) -> tuple[list[bytes], list[Entry]]:
    """What a new watcher gets before the live feed: entries after `since` from the ring, or,
    if it was compacted past `since`, a `compacted` notice and each key's newest entry."""
    feed = node.changes
    if since is None:
        return [], []
    ring = feed.since(since)
    if ring is not None:
        return [], [entry for entry in ring if wanted(entry)]
    through = feed.released_through
    head = sse_event(
        "compacted",
        {
            "since_version": since,
            "compacted_through": feed.compacted_through,
            "snapshot_through": through,
            "detail": "entries in between were compacted: each key's newest entry up to "
            "snapshot_through follows, then the live feed",
        },
    )
    return [head], [e for e in compacted_catch_up(node.store, since, through) if wanted(e)]


def shutdown_event(last: int, reason: str) -> bytes:
    return sse_event(
        "shutdown",
        {
            "last_version": last,
            "reason": reason,
            "detail": "this node is stopping and ends the stream; reconnect, to another node "
            "or to this one once it is back, with since_version=last_version",
        },
    )


def watch_router(
    node: ReadableNode, max_pending: int = MAX_PENDING, drain: Drain | None = None
) -> APIRouter:
    """`GET /watch`; a client more than `max_pending` entries behind (WATCH_MAX_PENDING) is
    cut off, which bounds what one that never reads can make the node hold. `drain` ends
    the streams when the node stops (default: one of the router's own, begun by SIGTERM)."""
    router = APIRouter(tags=["reads"])
    drain = drain or Drain()

    @router.get(
        "/watch",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": __doc__}},
        summary="Stream applied entries as Server-Sent Events",
    )
    async def watch(
        request: Request,
        since_version: SinceVersion = None,
        key: Annotated[str | None, Query(description="Only this key.")] = None,
        prefix: Annotated[str | None, Query(description="Only keys starting with this.")] = None,
        last_event_id: Annotated[int | None, Header(ge=0)] = None,
    ) -> StreamingResponse:
        """Every entry this node applies after `since_version`, in version order, then live.

        See the module's docstring (and docs/api/http.md) for the events."""
        feed = node.changes
        wanted = Filter(key, prefix, grant_of(request))
        since = since_version if since_version is not None else last_event_id
        subscription = Subscription(wanted, max_pending)

        async def stream() -> AsyncIterator[bytes]:
            # Subscribing and reading the ring happen with no await between them, so no
            # entry can fall between the catch-up and the live feed. Both happen here, in
            # the generator, so that its `finally` always unsubscribes.
            feed.subscribe(subscription)
            try:
                head, catch_up = catch_up_from(node, since, wanted)
                yield b": watching; each event's id is its version\n\n"
                for line in head:
                    yield line
                last = since or 0
                for entry in catch_up:
                    if subscription.stopping is not None:
                        break
                    last = max(last, entry.version)
                    yield event(entry)
                while True:
                    if subscription.stopping is not None:
                        yield shutdown_event(last, subscription.stopping)
                        return
                    if subscription.overflowed and subscription.queue.empty():
                        yield sse_event(
                            "overflow",
                            {
                                "last_version": last,
                                "error": f"this client fell {max_pending} entries behind and "
                                "is cut off; reconnect with since_version=last_version",
                            },
                        )
                        return
                    try:
                        async with asyncio.timeout(KEEPALIVE_S):
                            live = await subscription.queue.get()
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if live is None:  # stopping: the loop's first check ends the stream
                        continue
                    last = max(last, live.version)
                    yield event(live)
            finally:
                feed.unsubscribe(subscription)

        return DrainedStream(
            stream(),
            drain,
            subscription.stop,
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                LAST_VERSION_HEADER: str(node.applied_through),
            },
        )

    return router
