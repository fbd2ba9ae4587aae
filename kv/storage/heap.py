"""Keep the garbage collector's full collections short: they stall every request while they run.

Profiled under an open-loop load (benchmarks/latency.py), the leader's p99 was ten times its
p50 at a tenth of its maximum rate, and the stalls were CPython's full (generation 2)
collections: each traverses every tracked object, and a node holds a few hundred thousand
from its imports alone (FastAPI, pydantic, httpx) before it holds a single key. With the
collector off, the same p99 fell from 42 ms to 8.5 ms at 1,500 writes/s. Turning it off
for good would let reference cycles pile up, so instead :func:`freeze_startup_heap`
moves everything alive once the node has started into the permanent generation
(:func:`gc.freeze`, as Instagram does for its forked servers): full collections then
traverse only what the node made since, and cycles among new objects are still collected.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("kvstore")


def freeze_startup_heap() -> None:
    """Collect once, then exempt every surviving object from future collections; give what
    was freed back to the operating system."""
    gc.collect()
    gc.freeze()
    release_free_memory()
    log.debug(
        "froze %d start-up objects out of the garbage collector's reach", gc.get_freeze_count()
    )


@contextmanager
def bulk_load() -> Iterator[None]:
    """No collections while a node loads a store in bulk (a starting leader reading its
    followers' million keys), then the loaded store frozen too.

    Loading makes millions of objects that all survive, so each collection the
    allocations trigger finds nothing to free and traverses more than the last: measured
    on the leader's start-up read of 1,000,000 keys, they took about a third of it.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        freeze_startup_heap()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc's malloc_trim).

    Loading a million keys (a start-up read, a log replay) grows the store's dict table
    by doubling, and parses pages or records into objects that are all freed again; glibc
    keeps the freed space inside its heap, so it still counts in the node's RSS (about
    100 MiB after a starting leader read a million keys), until it is trimmed. Elsewhere
    than glibc this does nothing."""
    # The process's own symbols, libc's among them: no ctypes.util.find_library, which
    # runs ldconfig in a subprocess on every call.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class TrimAfterBulk:
    """Trims the C heap (:func:`release_free_memory`) a moment after a follower has applied
    many entries: a leader's snapshot, or a bulk load.

    Applying a batch parses it into objects that are freed once the store holds the
    entries, and the store's dict grows by doubling and frees its old table: glibc keeps all
    of that inside its heap. Measured on a follower given a million keys in batches, about
    10 MiB of its RSS, given back in under a millisecond by one trim. The trim waits
    `delay` seconds after the `threshold`-th entry applied since the last, so that a bulk
    load is trimmed about once a `delay` while it runs and once after it ends, and steady
    writes (a few a batch) only rarely.
    """

    def __init__(self, threshold: int = 10_000, delay: float = 1.0) -> None:
        self.threshold = threshold
        self.delay = delay
        self.pending = 0
        self.scheduled = False
        self.trims = 0

    def applied(self, count: int) -> bool:
        """Count `count` entries applied; True when a trim is now due in `delay` seconds
        (the caller schedules :meth:`trim`)."""
        self.pending += count
        if self.scheduled or self.pending < self.threshold:
            return False
        self.scheduled = True
        return True

    def trim(self) -> None:
        self.pending = 0
        self.scheduled = False
        self.trims += 1
        release_free_memory()
