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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Entry:
    """One versioned write or deletion, as held in a store and shipped to followers."""

    key: str
    value: Any
    version: int
    deleted: bool = False
    # The entry encoded once as JSON, so that fanning it out to every follower
    # does not serialise it once per follower.
    encoded: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def create(
        cls,
        key: str,
        value: Any,
        version: int,
        deleted: bool = False,
        value_json: str | None = None,
    ) -> Entry:
        """Build an entry; pass `value_json` when the value has been encoded already."""
        if value_json is None:
            value_json = encode_json(value)
        return cls(
            key,
            value,
            version,
            deleted,
            encode_entry(key, value_json, version, deleted),
        )


def encode_json(value: Any) -> str:
    """Compact JSON. Raises ValueError for NaN and infinities, which JSON cannot carry."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_entry(key: str, value_json: str, version: int, deleted: bool) -> bytes:
    flag = "true" if deleted else "false"
    text = f'{{"key":{encode_json(key)},"value":{value_json},"version":{version},"deleted":{flag}}}'
    return text.encode()


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: list[Entry]
    stale: int


class VersionedStore:
    """A map from key to its newest entry, tombstones included."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._last_version = 0

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

    def version_of(self, key: str) -> int:
        """The version held for `key`, tombstones included; 0 when never seen."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.version

    def keys(self) -> list[str]:
        return sorted(key for key, entry in self._entries.items() if not entry.deleted)

    def entries(self) -> list[Entry]:
        """Every entry, tombstones included, in version order: a full snapshot."""
        return sorted(self._entries.values(), key=lambda entry: entry.version)

    def live_items(self) -> list[Entry]:
        return [self._entries[key] for key in self.keys()]

    # -- leader side -----------------------------------------------------

    def put(self, key: str, value: Any, value_json: str | None = None) -> Entry:
        """Assign the next version and apply it, in one step (the leader's write)."""
        return self._assign(key, value, deleted=False, value_json=value_json)

    def delete(self, key: str) -> Entry | None:
        """Assign the next version to a tombstone for `key`; None when `key` is not live."""
        if self.get(key) is None:
            return None
        return self._assign(key, None, deleted=True, value_json="null")

    def _assign(self, key: str, value: Any, deleted: bool, value_json: str | None) -> Entry:
        version = self._last_version + 1
        entry = Entry.create(key, value, version, deleted, value_json)
        self._entries[key] = entry
        self._last_version = version
        return entry

    # -- replica side ----------------------------------------------------

    def maybe_apply(self, entry: Entry) -> bool:
        """Apply `entry` if it is newer than what is held for its key.

        Returns False, and changes nothing, when the entry is stale or a repeat.
        That is still a successful delivery: the replica holds something at
        least as new.
        """
        if entry.version > self._last_version:
            self._last_version = entry.version
        current = self._entries.get(entry.key)
        if current is not None and current.version >= entry.version:
            return False
        self._entries[entry.key] = entry
        return True

    def apply_batch(self, entries: list[Entry]) -> ApplyResult:
        applied = [entry for entry in entries if self.maybe_apply(entry)]
        return ApplyResult(applied=applied, stale=len(entries) - len(applied))

    def advance_to(self, version: int) -> None:
        """Make the next assigned version greater than `version` (seen elsewhere)."""
        self._last_version = max(self._last_version, version)
