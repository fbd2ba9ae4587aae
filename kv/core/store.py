"""The versioned key-value store that every node holds.

This module is the whole of the apply rule, kept free of I/O so that it can be
tested with plain asserts:

* the leader assigns versions from one counter, strictly increasing, and
  applies the write in the same synchronous call, so no replica can ever hold
  a newer version of a key than the leader does;
* a replica applies an entry only if its version is newer than what it holds
  for that key, so deliveries that arrive late or twice change nothing;
* a deletion is an entry too. It leaves a tombstone carrying its version, so a
  write that was overtaken by the deletion cannot resurrect the key when it
  arrives late.

Versions, terms and the entry itself are in :mod:`kv.core.records`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kv.core.records import BY_VERSION, Entry, TermExhaustedError, first_version, term_of
from kv.core.requests import RequestTable, RequestTag


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: list[Entry]
    stale: int


class VersionMismatch(Exception):
    """A conditional write's expected version is not the key's: nothing was written."""

    def __init__(self, key: str, expected: int | None, current: int) -> None:
        wanted = "to exist" if expected is None else f"at version {expected}"
        super().__init__(f"key {key!r} is at version {current}, not {wanted}")
        self.key = key
        self.expected = expected
        self.current = current


class VersionedStore:
    """A map from key to its newest entry, tombstones included."""

    def __init__(self, requests: RequestTable | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        # The idempotency keys of recent writes, learned from every entry this store sees.
        self.requests = requests if requests is not None else RequestTable()
        self._last_version = 0
        self._term = 0
        self._by_version: list[Entry] | None = None  # a version-ordered index, built on demand
        # fingerprint() kept up to date as entries change: computing it afresh walks every
        # entry (83 ms for a million), and the leader asks for it whenever a follower is read.
        self._fingerprint = 0

    @property
    def term(self) -> int:
        """The term this store assigns versions in (leader); 0 until one is begun."""
        return self._term

    def begin_term(self, term: int) -> None:
        """Assign versions in `term` from now on. It must be newer than every version seen."""
        if term <= max(self._term, term_of(self._last_version)):
            raise ValueError(
                f"term {term} is not newer than term {max(self._term, term_of(self._last_version))}"
            )
        self._term = term

    @property
    def last_version(self) -> int:
        """The highest version this store has seen, applied or not."""
        return self._last_version

    def get(self, key: str) -> Entry | None:
        """The live entry for `key`, or None when it is absent or deleted."""
        entry = self._entries.get(key)
        if entry is None or entry.deleted:
            return None
        return entry

    def live_version(self, key: str) -> int:
        """The key's version, or 0 if it is absent or deleted: what If-Match compares."""
        entry = self.get(key)
        return 0 if entry is None else entry.version

    def check_version(self, key: str, expected: int | None) -> None:
        """For a conditional write: raise VersionMismatch unless the key is at `expected`
        (0: absent or deleted; None: present, at any version, as If-Match: *)."""
        current = self.live_version(key)
        if (current == 0) if expected is None else (current != expected):
            raise VersionMismatch(key, expected, current)

    def held(self, key: str) -> Entry | None:
        """The newest entry for `key`, tombstone or not."""
        return self._entries.get(key)

    def holds(self, entry: Entry) -> bool:
        """Whether this store holds `entry` itself or a newer entry for its key.

        What a follower may confirm: holding the same version with other content
        (a version assigned twice) is not holding it.
        """
        held = self._entries.get(entry.key)
        if held is None:
            return False
        return held.version > entry.version or held.same_write(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return sorted(key for key, entry in self._entries.items() if not entry.deleted)

    def entries(self) -> list[Entry]:
        """Every entry, tombstones included, in version order: a full snapshot."""
        return sorted(self._entries.values(), key=BY_VERSION)

    def live_items(self) -> list[Entry]:
        return [self._entries[key] for key in self.keys()]

    def page(self, after_version: int, limit: int) -> list[Entry]:
        """Up to `limit` entries with a version above `after_version`, in version order.

        Paging through the store this way (each page starting after the last
        version of the one before) visits every entry once, as long as the store
        does not change in between; the index is rebuilt after any change.
        """
        if self._by_version is None:
            self._by_version = sorted(self._entries.values(), key=BY_VERSION)
        index = self._by_version
        start = bisect.bisect_right(index, after_version, key=BY_VERSION)
        return index[start : start + limit]

    def fingerprint(self) -> int:
        """An order-independent digest of every (key, version) held: equal stores, equal prints."""
        return self._fingerprint

    def _hold(self, entry: Entry, replaced: Entry | None) -> None:
        """Make `entry` the one held for its key, in place of `replaced`."""
        self._entries[entry.key] = entry
        self._by_version = None
        digest = self._fingerprint ^ hash((entry.key, entry.version))
        if replaced is not None:
            digest ^= hash((replaced.key, replaced.version))
        self._fingerprint = digest

    # -- leader side -----------------------------------------------------

    def put(
        self,
        key: str,
        value: Any,
        value_json: str | None = None,
        request: RequestTag | None = None,
    ) -> Entry:
        """Assign the next version and apply it, in one step (the leader's write)."""
        return self._assign(key, value, False, value_json, request)

    def delete(self, key: str, request: RequestTag | None = None) -> Entry | None:
        """Assign the next version to a tombstone for `key`; None when `key` is not live."""
        if self.get(key) is None:
            return None
        return self._assign(key, None, True, "null", request)

    def rewrite(self, entry: Entry) -> Entry:
        """Assign a new version to `entry`'s write: the leader settling a merged key."""
        return self._assign(entry.key, entry.value, entry.deleted, None, None)

    def _assign(
        self,
        key: str,
        value: Any,
        deleted: bool,
        value_json: str | None,
        request: RequestTag | None,
    ) -> Entry:
        version = self.next_version()
        entry = Entry.create(key, value, version, deleted, value_json, request)
        self._hold(entry, self._entries.get(key))
        self._last_version = version
        self.note_request(entry)
        return entry

    def note_request(self, entry: Entry) -> None:
        """Remember the idempotency key that made `entry`, if it has one, applied or not."""
        if entry.request is not None:
            self.requests.remember(entry.request, entry.key, entry.version, entry.deleted)

    def next_version(self) -> int:
        """The version the next write gets: above everything seen, inside the current term.

        Raises TermExhaustedError when that is impossible (the term is used up, or a
        version of a newer term has been seen): the leader must begin a new term.
        """
        term = max(self._term, 1)
        version = max(self._last_version + 1, first_version(term))
        if term_of(version) != term:
            raise TermExhaustedError(f"term {term} has no version above {self._last_version}")
        return version

    # -- replica side ----------------------------------------------------

    def maybe_apply(self, entry: Entry) -> bool:
        """Apply `entry` if it is newer than what is held for its key.

        Returns False, and changes nothing, when the entry is stale or a repeat.
        That is still a successful delivery: the replica holds something at
        least as new.
        """
        if entry.version > self._last_version:
            self._last_version = entry.version
        if entry.request is not None:
            self.note_request(entry)
        current = self._entries.get(entry.key)
        if current is not None and current.version >= entry.version:
            return False
        self._hold(entry, current)
        return True

    def apply_batch(self, entries: list[Entry]) -> ApplyResult:
        applied = [entry for entry in entries if self.maybe_apply(entry)]
        return ApplyResult(applied=applied, stale=len(entries) - len(applied))

    def advance_to(self, version: int) -> None:
        """Make the next assigned version greater than `version` (seen elsewhere)."""
        self._last_version = max(self._last_version, version)


def fingerprint(entries: Iterable[Entry]) -> int:
    """XOR of a hash of each (key, version): equal for equal sets, in any order.

    Only compared inside one process (Python salts string hashes per process).
    """
    digest = 0
    for entry in entries:
        digest ^= hash((entry.key, entry.version))
    return digest
