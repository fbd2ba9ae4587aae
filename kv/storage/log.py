"""An append-only log of entries on disk, with Redis-style fsync policies and compaction.

With `DATA_DIR` set, every entry a node applies is appended to a log file before
the node acknowledges it, as one line: the CRC-32 of the record, a space, and the
entry's JSON. On start the node reads the latest snapshot and then every log
file, so it comes back with what it acknowledged.

* **fsync policy** (`APPENDFSYNC`, after Redis's `appendfsync`): `always` fsyncs
  before a write is acknowledged (concurrent writes share one fsync), `everysec`
  fsyncs once a second in the background (a crash loses at most about a second),
  and `no` leaves it to the operating system.
* **Torn records.** A crash can leave the last line half-written. A bad last
  record is detected by its CRC or missing newline, dropped with a warning and cut
  off the file; damage before the last record is refused, since silently skipping
  entries in the middle could resurrect deleted keys.
* **Compaction.** When the logs outgrow the last snapshot (and a floor), the
  current store is written to a new snapshot and the old logs are deleted, so the
  time to restart follows the number of keys, not the length of history. New
  appends go to a fresh log file from the moment compaction starts, so nothing
  written during it is lost, and replaying a log twice is harmless because
  applying an entry is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kv.core.records import Entry
from kv.core.requests import RequestTable, RequestTag
from kv.core.store import VersionedStore
from kv.settings import FsyncPolicy

log = logging.getLogger("kvstore.durability")

SNAPSHOT = "snapshot.jsonl"
REQUESTS = "requests.jsonl"
TERM_FILE = "term.json"
CLEAN_STOP = "clean-stop"
"""Left by a node that closed its log, fsynced; removed at start-up. Absent: it crashed."""
LOG_PREFIX = "log-"
COMPACT_FLOOR_BYTES = 4 * 1024 * 1024
BULK_RECORDS = 50_000
"""Entries recorded at once past which the store is written as a snapshot instead."""


class CorruptLogError(RuntimeError):
    """Damage before the last record of a file: refused rather than skipped."""


def encode_record(entry: Entry) -> bytes:
    return encode_line(entry.wire)


def encode_line(payload: bytes) -> bytes:
    """One record: the CRC-32 of `payload`, a space, `payload` and a newline."""
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_line(line: bytes) -> bytes | None:
    """The payload of one record, or None if the line is damaged."""
    if len(line) < 10 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        return payload if int(line[:8], 16) == zlib.crc32(payload) else None
    except ValueError:
        return None


def decode_record(line: bytes) -> Entry | None:
    """The entry in one line, or None if the line is damaged."""
    payload = decode_line(line)
    if payload is None:
        return None
    try:
        return Entry.from_wire(payload)
    except (ValueError, KeyError, TypeError):
        return None


def overwritten_requests(store: VersionedStore) -> list[bytes]:
    """The remembered idempotency keys whose write is no longer the one held for its key, as
    records: a snapshot keeps only the newest entry of each key, so compaction keeps these
    beside it (in REQUESTS), and a restarted node still knows them."""
    records = []
    for request_id, seen in store.requests.items():
        held = store.held(seen.key)
        if held is not None and held.version == seen.version:
            continue  # the snapshot carries it, tag and all
        fields = {
            "id": request_id,
            "key": seen.key,
            "version": seen.version,
            "deleted": seen.deleted,
            "digest": seen.digest,
        }
        records.append(encode_line(json.dumps(fields, separators=(",", ":")).encode()))
    return records


def read_requests(path: Path, store: VersionedStore) -> None:
    """Remember the requests kept by the last compaction; a damaged record is skipped (it
    only means that a retry of that one request, if it ever comes, is not recognised)."""
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            data = json.loads(decode_line(line) or b"null")
            tag = RequestTag(str(data["id"]), int(data["digest"]))
            key, version, deleted = str(data["key"]), int(data["version"]), bool(data["deleted"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: skipped a damaged record", path)
            continue
        store.requests.remember(tag, key, version, deleted)


@dataclass
class Recovery:
    entries: list[Entry]
    files: int
    dropped_tail: int  # bytes cut off a torn last record


def read_file(path: Path, *, repair: bool, each: Callable[[Entry], object]) -> tuple[int, int]:
    """Read one log or snapshot file, handing `each` every entry in order; drop (and with
    `repair`, truncate) a torn last record. Returns the records read and the bytes dropped."""
    data = path.read_bytes()
    offset = records = 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        line = data[offset:] if end < 0 else data[offset : end + 1]
        entry = decode_record(line)
        if entry is None:
            if end >= 0 and end + 1 < len(data):
                raise CorruptLogError(
                    f"{path}: damaged record at byte {offset} with more records after it; "
                    "refusing to start rather than skip entries (restore the file or remove it)"
                )
            dropped = len(data) - offset
            log.warning("%s: dropped a torn last record (%d bytes) left by a crash", path, dropped)
            if repair:
                with path.open("r+b") as handle:
                    handle.truncate(offset)
                    os.fsync(handle.fileno())
            return records, dropped
        each(entry)
        records += 1
        offset += len(line)
    return records, 0


class DurableLog:
    """The on-disk log of one node. Appends are synchronous; fsyncs may be awaited."""

    def __init__(
        self,
        directory: Path,
        policy: FsyncPolicy = FsyncPolicy.EVERYSEC,
        *,
        compact_floor_bytes: int = COMPACT_FLOOR_BYTES,
    ) -> None:
        self.directory = directory
        self.policy = policy
        self.compact_floor_bytes = compact_floor_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._retired: list[int] = []  # earlier logs' fds, closed once no fsync uses them
        self._fsyncs_running = 0
        self._log_seq = 0
        self._appended = 0  # records appended so far
        self._synced = 0  # records known to be on disk
        self._sync_task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._ticker: asyncio.Task[None] | None = None
        self.log_bytes = 0
        self.snapshot_bytes = 0
        self.log_records = 0  # records in the logs, which the snapshot does not hold
        self.snapshot_records = 0  # one a key, when it was written
        self.compactions = 0
        self.complete = False
        """Set by :meth:`recover`: whether every record appended before is back."""

    # -- start-up ------------------------------------------------------------

    def _log_files(self) -> list[Path]:
        files = self.directory.glob(f"{LOG_PREFIX}*.jsonl")
        return sorted(files, key=lambda p: int(p.stem.removeprefix(LOG_PREFIX)))

    def recover(self, each: Callable[[Entry], object] | None = None) -> Recovery:
        """Read the snapshot and every log, in order; open a new log for appends.

        With `each`, every entry is handed to it as it is read (a replay into a store), and
        none is kept: a million entries never live at once."""
        entries: list[Entry] = []
        each = each or entries.append
        dropped = 0
        files = 0
        clean_stop = self.directory / CLEAN_STOP
        stopped_cleanly = clean_stop.exists()
        clean_stop.unlink(missing_ok=True)
        snapshot = self.directory / SNAPSHOT
        if snapshot.exists():
            self.snapshot_records, _ = read_file(snapshot, repair=False, each=each)
            files += 1
            self.snapshot_bytes = snapshot.stat().st_size
        for path in self._log_files():
            records, torn = read_file(path, repair=True, each=each)
            self.log_records += records
            dropped += torn
            files += 1
            self.log_bytes += path.stat().st_size
            self._log_seq = int(path.stem.removeprefix(LOG_PREFIX))
        self._open_next_log()
        # Every record this node appended is back only if none was torn off and either each
        # was fsynced before it was confirmed or the last process stopped cleanly. A new,
        # empty directory may be a wiped one: it promises nothing either.
        self.complete = (
            files > 0 and dropped == 0 and (stopped_cleanly or self.policy == FsyncPolicy.ALWAYS)
        )
        return Recovery(entries, files, dropped)

    def _open_next_log(self) -> None:
        self._log_seq += 1
        path = self.directory / f"{LOG_PREFIX}{self._log_seq}.jsonl"
        old = self._fd
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if old is not None:
            os.fsync(old)
            self._synced = self._appended  # all of it was in the old log
            self._retired.append(old)
            self._close_retired()
        self._fsync_directory()

    async def _fsync(self) -> None:
        """fsync the current log in a thread, covering every append made before it."""
        target, fd = self._appended, self._fd
        if fd is None:
            return
        self._fsyncs_running += 1
        try:
            await asyncio.to_thread(os.fsync, fd)
        finally:
            self._fsyncs_running -= 1
            self._close_retired()
        self._synced = max(self._synced, target)

    def _close_retired(self) -> None:
        if self._fsyncs_running == 0:
            while self._retired:
                os.close(self._retired.pop())

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- the write path --------------------------------------------------------

    def append(self, entries: Sequence[Entry]) -> None:
        """Write entries to the log (the OS's buffer); :meth:`sync` makes them durable."""
        if not entries or self._fd is None:
            return
        data = b"".join(encode_record(entry) for entry in entries)
        os.write(self._fd, data)
        self._appended += len(entries)
        self.log_records += len(entries)
        self.log_bytes += len(data)

    async def sync(self) -> None:
        """Return once everything appended so far is on disk, if the policy says to wait."""
        if self.policy != FsyncPolicy.ALWAYS or self._synced >= self._appended:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._appended, future))
        if self._sync_task is None:
            self._sync_task = asyncio.create_task(self._sync_waiters())
        await future

    async def _sync_waiters(self) -> None:
        """One fsync at a time, each covering every append made before it started."""
        try:
            while self._waiters:
                await self._fsync()
                still_waiting = []
                for wanted, future in self._waiters:
                    if wanted <= self._synced:
                        if not future.done():
                            future.set_result(None)
                    else:
                        still_waiting.append((wanted, future))
                self._waiters = still_waiting
        finally:
            self._sync_task = None

    def start(self) -> None:
        if self.policy == FsyncPolicy.EVERYSEC:
            self._ticker = asyncio.create_task(self._every_second())

    async def _every_second(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self._synced < self._appended:
                await self._fsync()

    # -- compaction ------------------------------------------------------------

    def maybe_compact(self, store: VersionedStore) -> bool:
        """Replace the logs by a snapshot of `store` once what they hold that a later record
        superseded outgrows it (as Redis rewrites its AOF once it has doubled); True if it did.

        A log record either brought a key the store did not hold, or superseded an earlier
        record of its key. Only the second kind is garbage: a follower taking a snapshot of
        a million keys, or a bulk load, appends a log of new keys that a compaction would
        only copy, and compacting it at every doubling took a third of a follower's CPU
        while it took a snapshot (and held its event loop for up to a second each time)."""
        new_keys = len(store) - self.snapshot_records
        superseded = max(0, self.log_records - new_keys)
        garbage_bytes = self.log_bytes * superseded // max(1, self.log_records)
        if garbage_bytes < max(self.compact_floor_bytes, self.snapshot_bytes):
            return False
        self.compact_store(store)
        return True

    def compact_store(self, store: VersionedStore) -> None:
        """Replace the logs by a snapshot of `store`, and the requests it no longer carries."""
        self.compact(store.snapshot(), overwritten_requests(store))

    def compact(self, entries: Sequence[Entry], requests: list[bytes] | None = None) -> None:
        old_logs = self._log_files()
        self._open_next_log()  # appends from now on go to a log the snapshot does not cover
        self._write_atomically(REQUESTS, requests or [])
        # A generator: a store's snapshot (StoreView) is read as it is written out.
        self._write_atomically(SNAPSHOT, (encode_record(entry) for entry in entries))
        current = self.directory / f"{LOG_PREFIX}{self._log_seq}.jsonl"
        for path in old_logs:
            if path != current:
                path.unlink(missing_ok=True)
        self.snapshot_bytes = (self.directory / SNAPSHOT).stat().st_size
        self.snapshot_records = len(entries)
        self.log_bytes = current.stat().st_size
        self.log_records = 0  # appends since went to `current`, which is empty or nearly
        self.compactions += 1
        log.info("compacted the log into a snapshot of %d entries", len(entries))

    def _write_atomically(self, name: str, records: Iterable[bytes]) -> None:
        temporary = self.directory / (name + ".tmp")
        with temporary.open("wb") as handle:
            handle.writelines(records)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.directory / name)
        self._fsync_directory()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._sync_task is not None:
            await asyncio.gather(self._sync_task, return_exceptions=True)
        if self._fd is not None:
            os.fsync(self._fd)  # whatever the policy: a clean stop promises every record
            os.close(self._fd)
            self._fd = None
            (self.directory / CLEAN_STOP).touch()
            self._fsync_directory()
        self._close_retired()


def restore(directory: Path, policy: FsyncPolicy, store: VersionedStore) -> DurableLog:
    """Open a node's log in `directory` and replay it into `store`."""
    durable = DurableLog(directory, policy)
    if (requests := directory / REQUESTS).exists():
        read_requests(requests, store)
    recovery = durable.recover(store.maybe_apply)
    log.info(
        "restored %d keys, tombstones included (last version %d) from %d file(s) in %s; "
        "appendfsync %s",
        len(store),
        store.last_version,
        recovery.files,
        directory,
        policy.value,
    )
    return durable


def load_term(directory: Path) -> tuple[int, str | None]:
    """The newest term recorded in `directory` and the leader that began it; (0, None) if none."""
    data = load_record(directory, TERM_FILE)
    if data is None:
        return 0, None
    try:
        return int(data["term"]), data.get("leader_id")
    except (ValueError, KeyError, TypeError) as error:
        path = directory / TERM_FILE
        raise CorruptLogError(f"{path}: unreadable term record ({error})") from None


def save_term(directory: Path, term: int, leader_id: str | None) -> None:
    """Record a new term durably (whatever APPENDFSYNC says): a term is used only once on disk."""
    save_record(directory, TERM_FILE, {"term": term, "leader_id": leader_id})


def load_record(directory: Path, name: str) -> dict[str, Any] | None:
    """A small JSON record kept beside the log (the term, an HA node's leases); None if absent."""
    path = directory / name
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except ValueError as error:
        raise CorruptLogError(f"{path}: unreadable record ({error})") from None
    if not isinstance(data, dict):
        raise CorruptLogError(f"{path}: unreadable record (not a JSON object)")
    return data


def save_record(directory: Path, name: str, data: dict[str, Any]) -> None:
    """Replace a small JSON record durably: written aside, fsynced, renamed, directory fsynced."""
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / (name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(json.dumps(data).encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / name)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    """A node's store and, with DATA_DIR, its log: the one place both roles write through."""

    def __init__(
        self,
        data_dir: Path | None,
        policy: FsyncPolicy = FsyncPolicy.EVERYSEC,
        requests: RequestTable | None = None,
    ) -> None:
        self.store = VersionedStore(requests)
        self.data_dir = data_dir
        self.policy = policy
        self.durable: DurableLog | None = None

    def open(self) -> None:
        """Replay the log, if there is one; call once at start-up, inside the event loop."""
        if self.data_dir is not None:
            self.durable = restore(self.data_dir, self.policy, self.store)
            self.durable.start()

    @property
    def complete(self) -> bool:
        """Whether this node came back with every entry it ever confirmed: a DATA_DIR whose
        log lost nothing (see DurableLog.complete). Without DATA_DIR, never."""
        return self.durable is not None and self.durable.complete

    def load_term(self) -> tuple[int, str | None]:
        """The term recorded in DATA_DIR; (0, None) without DATA_DIR."""
        return (0, None) if self.data_dir is None else load_term(self.data_dir)

    def save_term(self, term: int, leader_id: str | None) -> None:
        if self.data_dir is not None:
            save_term(self.data_dir, term, leader_id)

    def record(self, entries: Sequence[Entry]) -> None:
        """Append applied entries to the log (compacting it when it has grown).

        Past BULK_RECORDS at once (a starting leader adopting its followers' keys, all
        applied to the store already), the store is written out as a snapshot instead: it
        holds every one of them, and is written a chunk at a time, where appending them would
        encode them all at once and then compact anyway."""
        if self.durable is not None and entries:
            if len(entries) > BULK_RECORDS:
                self.durable.compact_store(self.store)
                return
            self.durable.append(entries)
            self.durable.maybe_compact(self.store)

    @property
    def waits_for_fsync(self) -> bool:
        """Whether acknowledging must wait for :meth:`sync` (APPENDFSYNC=always)."""
        return self.durable is not None and self.policy == FsyncPolicy.ALWAYS

    async def sync(self) -> None:
        """Wait until recorded entries are on disk, where the fsync policy asks for it."""
        if self.durable is not None:
            await self.durable.sync()

    async def close(self) -> None:
        if self.durable is not None:
            await self.durable.close()
            self.durable = None
