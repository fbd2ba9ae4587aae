"""The leader's replication rules, with no I/O: terms, start-up, writes, merging late followers.

:class:`leader_node.LeaderNode` wraps this with the network (delivery loops, the
start-up read); the model-based test drives it directly. Everything that has to
leave the leader is handed to the hooks it is built with: `record` (append to
the log), `save_term` (persist a term) and `broadcast` (send an entry to every
follower, with no one waiting for it).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kv.core.records import Entry, TermExhaustedError, term_of
from kv.core.requests import RequestTag
from kv.core.startup import StartupMerge, merge_entries
from kv.core.store import VersionedStore


class _Unconditional:
    """The default of `if_version`: write whatever the key's version."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Unconditional()
Expected = int | None
"""A conditional write's expectation: a version, 0 for "absent", None for "present"."""

log = logging.getLogger("kvstore.leader")


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key already used for a different request (another key, value or
    operation): a client bug, refused rather than guessed at."""

    def __init__(self, request_id: str, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {request_id!r} was already used for a different request (it wrote "
            f"key {key!r} with other content); use a new key for a new request"
        )


@dataclass(frozen=True, slots=True)
class Replay:
    """A repeated request's earlier write: `answer` is what it wrote, `confirm` the entry
    followers must hold for it to be at quorum (the key's newest: holding it means holding
    the earlier write or something newer)."""

    answer: Entry
    confirm: Entry


def _ignore(*_: object) -> None:
    return None


class LeaderCore:
    """One leader incarnation: its store, the terms it has begun, and its start-up merge."""

    def __init__(
        self,
        store: VersionedStore,
        startup_quorum: int,
        *,
        leader_id: str | None = None,
        persisted_term: int = 0,
        record: Callable[[Sequence[Entry]], None] = _ignore,
        save_term: Callable[[int, str], None] = _ignore,
        broadcast: Callable[[Entry], None] = _ignore,
        granted_term: int | None = None,
        deposed: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.leader_id = leader_id or uuid.uuid4().hex
        self.own_terms: set[int] = set()
        self.startup = StartupMerge(store, startup_quorum, persisted_term, granted_term)
        self.deposed = deposed
        self.ready = False
        self.record = record
        self.save_term = save_term
        self.broadcast = broadcast

    @property
    def term(self) -> int:
        return self.store.term

    @property
    def last_version(self) -> int:
        """Every write up to this version is applied here: the leader applies in order."""
        return self.store.last_version

    # -- terms -----------------------------------------------------------------------

    def begin_term(self, term: int) -> None:
        """Persist `term` (when there is a DATA_DIR) before assigning a single version in it."""
        self.save_term(term, self.leader_id)
        self.store.begin_term(term)
        self.own_terms.add(term)
        log.info("began term %d", term)

    def observe_term(self, term: int, foreign: bool = False) -> None:
        """A follower has seen `term` (`foreign`: begun by another leader). If ours is not
        newer, begin a term above it, so that nothing we assign can collide with its versions.

        An elected leader (`deposed` is set) never picks a term itself: another leader has
        begun a newer one, so it calls `deposed` to step down instead."""
        if term > self.term or (foreign and term >= self.term):
            if self.deposed is not None:
                self.deposed(term)
                return
            self.begin_term(max(term, term_of(self.store.last_version)) + 1)

    # -- start-up ----------------------------------------------------------------------

    def finish_startup(self) -> dict[str, tuple[str, bool]]:
        """The read quorum holds the new term: begin it, settle conflicts, take writes.

        Returns, for each follower read, its node_id and whether it held exactly
        what the leader now holds (if not, it gets a snapshot).
        """
        assert self.startup.ready and self.startup.chosen_term is not None
        self.record(self.startup.adopted())
        self.startup.adopted_keys = []  # recorded: the list of a million keys can go
        self.begin_term(self.startup.chosen_term)
        reports = self.startup.followers_in_sync()
        self.restamp(self.startup.restamp)
        self.ready = True
        return reports

    def not_ready_reason(self, followers: int) -> str | None:
        return None if self.ready else self.startup.waiting_reason(followers)

    # -- writes --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        value: Any,
        value_json: str | None = None,
        if_version: Expected = ANY,
        request: RequestTag | None = None,
    ) -> Entry:
        """Assign the next version and apply the write, in one synchronous step.

        With `if_version` (a version, 0 for "absent", or None for "present"), only if the
        key is at it: checked in the same step, so no other write can come between the
        check and the version (raises VersionMismatch, writing nothing). With `request`
        (its Idempotency-Key), the entry carries it to every replica; call
        :meth:`replay` first, to answer a repeat without writing again.
        """
        if if_version is not ANY:
            self.store.check_version(key, if_version)
        entry = self._assigning(lambda: self.store.put(key, value, value_json, request))
        self.record([entry])
        return entry

    def delete(
        self, key: str, if_version: Expected = ANY, request: RequestTag | None = None
    ) -> Entry | None:
        if if_version is not ANY:
            self.store.check_version(key, if_version)
        entry = self._assigning(lambda: self.store.delete(key, request))
        if entry is not None:
            self.record([entry])
        return entry

    def replay(self, request: RequestTag, key: str, value: Any) -> Replay | None:
        """The write an earlier request with this Idempotency-Key made, or None if there is
        none to remember (a new request, or one that wrote nothing: it is tried again).

        The check comes before any conditional one: a compare-and-set whose answer was lost
        would fail its own retry otherwise. Raises IdempotencyKeyReused when the key was
        used for a different request.
        """
        seen = self.store.requests.lookup(request.id)
        if seen is None:
            return None
        if seen.digest != request.digest or seen.key != key:
            raise IdempotencyKeyReused(request.id, seen.key)
        held = self.store.held(key)
        if held is None or held.version < seen.version:
            log.warning("request %r wrote version %d, which is lost", request.id, seen.version)
            return None
        if held.version == seen.version:
            return Replay(held, held)
        value = None if seen.deleted else value  # the same request, so the same value
        return Replay(Entry.create(key, value, seen.version, seen.deleted, request=request), held)

    def _assigning(self, assign: Callable[[], Any]) -> Any:
        try:
            return assign()
        except TermExhaustedError:
            self.begin_term(term_of(self.store.last_version) + 1)
            return assign()

    # -- late followers --------------------------------------------------------------------

    def merge(self, entries: list[Entry]) -> None:
        """Merge a page of a late follower's entries; send every follower what was adopted."""
        outcome = merge_entries(self.store, entries, self.own_terms)
        if outcome.adopted:
            self.record(outcome.adopted)
            for entry in outcome.adopted:
                self.broadcast(entry)
            log.info("took %d newer entries from a late follower", len(outcome.adopted))
        self.restamp(outcome.restamp)

    def in_sync(self, print_: int) -> bool:
        return print_ == self.store.fingerprint()

    def restamp(self, entries: list[Entry]) -> None:
        """Write each entry again under a new version, if the leader still holds it."""
        settled = 0
        for held in entries:
            if self.store.held_version(held.key) != held.version:
                continue  # written since: that write is newer than anything merged
            entry = self._rewrite(held)
            self.record([entry])
            self.broadcast(entry)
            settled += 1
        if settled:
            log.warning("wrote %d key(s) again in term %d to settle them", settled, self.term)

    def _rewrite(self, held: Entry) -> Entry:
        return self._assigning(lambda: self.store.rewrite(held))
