"""Idempotency keys: which client request made which write, so that a retry is not a new write.

A client sends an ``Idempotency-Key`` with a write and the same key again when it
retries. The leader tags the entry it assigns with a :class:`RequestTag` (the key and
a digest of what was asked), and the tag travels with the entry: to every follower,
into every log and snapshot. Every node therefore keeps the same
:class:`RequestTable`, and a leader (the same one after a restart, or a follower
promoted after a failover) that sees the key again answers with the write it already
made instead of making another.

The table forgets a key after `window_s` seconds, or sooner once it holds
`max_keys` of them (the oldest first), so its memory is bounded whatever the load.
Times are this node's clock when it learned of the key: a node that restarts
remembers what it replays from its log for a full window again, never less.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MAX_KEY_LENGTH = 255
DEFAULT_WINDOW_S = 600.0
DEFAULT_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class RequestTag:
    """The idempotency key of the request that made an entry, and a digest of that request."""

    id: str
    digest: int


def request_digest(key: str, deleted: bool, value_json: str) -> int:
    """A digest of a write request: its key, whether it deletes, and its value as JSON.

    A key sent again with a different request is a client bug (Stripe answers it with
    an error too); the digest is how it is told apart from an honest retry.
    """
    data = f"{'D' if deleted else 'P'}{len(key)}:{key}{value_json}".encode()
    return zlib.crc32(data)


def invalid_key_reason(idempotency_key: str) -> str | None:
    """Why a client's Idempotency-Key is unusable, or None when it is fine."""
    if not idempotency_key or len(idempotency_key) > MAX_KEY_LENGTH:
        return f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters"
    if not idempotency_key.isascii() or not idempotency_key.isprintable():
        return "Idempotency-Key must be printable ASCII (a UUID is a good choice)"
    return None


@dataclass(frozen=True, slots=True)
class Remembered:
    """What a node knows of a request: the write it made."""

    key: str
    version: int
    deleted: bool
    digest: int
    learned_at: float


class RequestTable:
    """Idempotency keys seen in the last `window_s` seconds, at most `max_keys` of them."""

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self.clock = clock
        # Insertion order is learning order, so the oldest key is always the first one.
        self._seen: dict[str, Remembered] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, tag: RequestTag, key: str, version: int, deleted: bool) -> None:
        """Note that request `tag` made the write `key`@`version`. A request is remembered
        by its first write: a copy of the entry arriving again (a snapshot, a replay of
        the log) changes nothing."""
        if tag.id in self._seen:
            return
        now = self.clock()
        self._seen[tag.id] = Remembered(key, version, deleted, tag.digest, now)
        self._forget_old(now)

    def lookup(self, request_id: str) -> Remembered | None:
        """The write `request_id` made, if it is still remembered."""
        self._forget_old(self.clock())
        return self._seen.get(request_id)

    def items(self) -> Iterator[tuple[str, Remembered]]:
        """Every remembered request, oldest first: what a snapshot of the log keeps."""
        return iter(list(self._seen.items()))

    def _forget_old(self, now: float) -> None:
        seen = self._seen
        horizon = now - self.window_s
        while seen:
            oldest = next(iter(seen))
            if len(seen) <= self.max_keys and seen[oldest].learned_at > horizon:
                return
            del seen[oldest]
