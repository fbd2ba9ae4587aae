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
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from kv.core.records import (
    Entry,
    TermExhaustedError,
    dump_trusted,
    entry_json,
    first_version,
    term_of,
)
from kv.core.requests import RequestTable, RequestTag

_VERSION = struct.Struct(">Q")  # big endian: records compare as bytes in version order
VERSION_BYTES = _VERSION.size
"""A packed record starts with its version in this many bytes, big endian."""


def version_of(record: bytes) -> int:
    """The version a packed record holds."""
    version: int = _VERSION.unpack_from(record)[0]
    return version


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
    """A map from key to its newest entry, tombstones included.

    Each key's entry is held packed, as one bytes object: its version (eight bytes, big
    endian) and then its value's JSON, empty for a tombstone. A million `Entry` objects, each
    with its own version integer and JSON, cost about 310 bytes a key; packed, a key costs
    its string, its slot in the dict and about 64 bytes, and a dict of strings and bytes is
    not even traversed by the garbage collector. An :class:`Entry` is made again when one is
    asked for (a read, a page, a snapshot's batch), so callers never see the packing.

    The dict is kept in version order while it can be (an entry that replaces another moves
    to the end, and versions usually arrive in order): pages and snapshots then read it as
    it is, and it is sorted only after an entry arrived out of order.
    """

    def __init__(self, requests: RequestTable | None = None) -> None:
        self._records: dict[str, bytes] = {}
        # The request tags of held entries that have one (most have none).
        self._tags: dict[str, RequestTag] = {}
        # The idempotency keys of recent writes, learned from every entry this store sees.
        self.requests = requests if requests is not None else RequestTable()
        self._last_version = 0
        self._term = 0
        self._top = 0  # the highest version held
        self._in_order = True  # whether the dict's order is version order
        # The keys in version order, made on demand. A tuple, not a list: the garbage
        # collector stops tracking a tuple of strings the first time it looks at it, while
        # it traverses a list's million items in every full collection, about 15 ms each,
        # every quarter of a second while a leader ships a snapshot.
        self._order: tuple[str, ...] | None = None
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
        record = self._records.get(key)
        if record is None or len(record) == VERSION_BYTES:
            return None
        return self._entry(key)

    def live_version(self, key: str) -> int:
        """The key's version, or 0 if it is absent or deleted: what If-Match compares."""
        record = self._records.get(key)
        if record is None or len(record) == VERSION_BYTES:
            return 0
        return version_of(record)

    def check_version(self, key: str, expected: int | None) -> None:
        """For a conditional write: raise VersionMismatch unless the key is at `expected`
        (0: absent or deleted; None: present, at any version, as If-Match: *)."""
        current = self.live_version(key)
        if (current == 0) if expected is None else (current != expected):
            raise VersionMismatch(key, expected, current)

    def held(self, key: str) -> Entry | None:
        """The newest entry for `key`, tombstone or not."""
        return self._entry(key) if key in self._records else None

    def held_version(self, key: str) -> int:
        """The version of the newest entry for `key`, tombstone or not; 0 if there is none."""
        record = self._records.get(key)
        return 0 if record is None else version_of(record)

    def holds(self, entry: Entry) -> bool:
        """Whether this store holds `entry` itself or a newer entry for its key.

        What a follower may confirm: holding the same version with other content
        (a version assigned twice) is not holding it.
        """
        record = self._records.get(entry.key)
        if record is None:
            return False
        version = version_of(record)
        if version != entry.version:
            return version > entry.version
        if record[VERSION_BYTES:] == (b"" if entry.deleted else entry.value_json):
            return True
        return self._entry(entry.key).same_write(entry)  # the same value, spelt apart

    def __len__(self) -> int:
        return len(self._records)

    def keys(self) -> list[str]:
        return sorted(key for key, record in self._records.items() if len(record) > VERSION_BYTES)

    def entries(self) -> list[Entry]:
        """Every entry, tombstones included, in version order: a full snapshot, made at once
        (see :meth:`snapshot` for one read as it is used)."""
        return self._unpack(self._version_order())

    def snapshot(self) -> StoreView:
        """Every key's entry in version order, read a slice at a time as it is used."""
        return StoreView(self, self._version_order(), self._top)

    def view(self, keys: Sequence[str]) -> StoreView:
        """The entries of `keys` (each held), read when asked."""
        return StoreView(self, keys, self._top)

    def live_items(self) -> list[Entry]:
        return self._unpack(self.keys())

    def page(self, after_version: int, limit: int) -> list[Entry]:
        """Up to `limit` entries with a version above `after_version`, in version order.

        Paging through the store this way (each page starting after the last
        version of the one before) visits every entry once, as long as the store
        does not change in between; the order is made again after any change.
        """
        order = self._version_order()
        records = self._records
        # A record's first eight bytes are its version, big endian: comparing records as
        # bytes compares their versions, with no key function of our own to call.
        after = _VERSION.pack(max(after_version, 0) + 1)
        start = bisect.bisect_left(order, after, key=records.__getitem__)
        if start + limit >= len(order):
            self._order = None  # the reader is done: 8 MiB a million keys, made again if asked
        return self._unpack(order[start : start + limit])

    def fingerprint(self) -> int:
        """An order-independent digest of every (key, version) held: equal stores, equal prints."""
        return self._fingerprint

    def _version_order(self) -> tuple[str, ...]:
        """The keys in version order: the dict's own order, once sorted if it had to be."""
        if self._order is None:
            if not self._in_order:
                records = self._records
                # Records compare as their versions first, so sorting the keys by their
                # records calls no Python function per key (150 ms for a million).
                self._records = {
                    key: records[key] for key in sorted(records, key=records.__getitem__)
                }
                self._in_order = True
            self._order = tuple(self._records)
        return self._order

    def _hold(self, entry: Entry, replaced: int) -> None:
        """Hold `entry`, packed, in place of version `replaced` of its key (0: none)."""
        records, key, version, request = self._records, entry.key, entry.version, entry.request
        if replaced:
            del records[key]  # to the end of the dict, where the newest versions are
        # A tombstone holds no value.
        records[key] = _VERSION.pack(version) + (b"" if entry.deleted else entry.value_json)
        if version > self._top:
            self._top = version
        else:
            self._in_order = False
        self._order = None
        if request is not None:
            self._tags[key] = request
        elif self._tags:
            self._tags.pop(key, None)
        digest = self._fingerprint ^ hash((key, version))
        if replaced:
            digest ^= hash((key, replaced))
        self._fingerprint = digest

    def _entry(self, key: str) -> Entry:
        """The entry held for `key` (which must be held)."""
        return self._unpack((key,))[0]

    def _unpack(self, keys: Iterable[str]) -> list[Entry]:
        """The entries of `keys` (each held), made in one loop: a snapshot makes a million,
        so everything is looked up once, outside it."""
        records, tags, unpack, dumps, make = (
            self._records,
            self._tags,
            _VERSION.unpack_from,
            dump_trusted,
            Entry,
        )
        entries = []
        for key in keys:
            record = records[key]
            version = unpack(record)[0]
            deleted = len(record) == VERSION_BYTES  # a tombstone holds no value
            value = b"null" if deleted else record[VERSION_BYTES:]
            encoding = entry_json(dumps(key), value, version, deleted)
            tag = tags.get(key) if tags else None
            entries.append(make(key, None, version, deleted, encoding, tag))
        return entries

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
        if self.live_version(key) == 0:
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
        self._hold(entry, self.held_version(key))
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
        current = self.held_version(entry.key)
        if current >= entry.version:
            return False
        self._hold(entry, current)
        return True

    def apply_batch(self, entries: list[Entry]) -> ApplyResult:
        applied = [entry for entry in entries if self.maybe_apply(entry)]
        return ApplyResult(applied=applied, stale=len(entries) - len(applied))

    def advance_to(self, version: int) -> None:
        """Make the next assigned version greater than `version` (seen elsewhere)."""
        self._last_version = max(self._last_version, version)


class StoreView(Sequence[Entry]):
    """Some of a store's keys (all of them, in version order, for a snapshot), each read as
    its entry only when asked: a million entries are never all made at once.

    An entry read later may be newer than the one held when the view was taken (never
    older: keys are never removed). `top` is the highest version then held, so a reader can
    tell the entries that changed since (they are above it) from those that did not.
    """

    def __init__(self, store: VersionedStore, keys: Sequence[str], top: int) -> None:
        self._store = store
        self._keys = keys
        self.top = top

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, index: int) -> Entry: ...

    @overload
    def __getitem__(self, index: slice) -> list[Entry]: ...

    def __getitem__(self, index: int | slice) -> Entry | list[Entry]:
        store = self._store
        if isinstance(index, slice):
            return store._unpack(self._keys[index])
        key = self._keys[index]
        return store._entry(key)

    def holds_at(self, index: int, key: str, version: int) -> bool:
        """Whether the `index`-th key of the view is `key`, held now at `version`."""
        return self._keys[index] == key and self._store.held_version(key) == version

    def tail(self, start: int) -> StoreView:
        """The view from its `start`-th key on."""
        return StoreView(self._store, self._keys[start:], self.top)

    def __iter__(self) -> Iterator[Entry]:
        for start in range(0, len(self._keys), 1024):
            yield from self[start : start + 1024]

    def newest(self, count: int) -> list[Entry]:
        """The `count` entries of the highest versions (each key once), newest first: all a
        bounded change feed keeps of a million adopted keys."""
        records = self._store._records
        # Sorted by their records (versions first), with no Python function per key: a
        # tenth of the time of heapq.nlargest's, whose key function runs in Python.
        newest: dict[str, None] = {}
        for key in reversed(sorted(self._keys, key=records.__getitem__)):
            if len(newest) == count:
                break
            newest[key] = None
        return self._store._unpack(newest)


def fingerprint(entries: Iterable[Entry]) -> int:
    """XOR of a hash of each (key, version): equal for equal sets, in any order.

    Only compared inside one process (Python salts string hashes per process).
    """
    digest = 0
    for entry in entries:
        digest ^= hash((entry.key, entry.version))
    return digest
