"""How much of the store a follower that is behind needs again. No I/O.

A follower back from a restart with its DATA_DIR holds nearly everything: what it lacks
is what was written while it was away. The leader reads all its entries anyway (it may
hold writes the leader lacks), and a follower whose entries differ from the leader's got
a snapshot of the whole store, a million entries to send for a few hundred missed.

Both stores can be read in version order, the follower's page by page. Where the two
sequences agree on their first n entries (the same key at the same version, one by one),
the follower holds every entry of the leader's below the n-th's version, so sending the
leader's entries from the n-th on completes it: a suffix of the snapshot, not all of it.
Anything that disagrees (a write the follower missed, a key the leader rewrote meanwhile,
one the follower holds newer) ends the common prefix there, so the suffix only ever errs
towards sending more, and apply-if-newer makes sending more harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kv.core.records import Entry
from kv.core.store import StoreView


class CommonPrefix:
    """The leading entries a follower's store shares with the leader's, in version order,
    measured as the follower's pages are read.

    `leader` is the leader's snapshot when the read began: entries written since are on
    their way to the follower in its outbox already, and are not the suffix's to send.
    """

    def __init__(self, leader: Sequence[Entry]) -> None:
        self._leader = leader
        self.length = 0
        self._open = True

    def read(self, page: Sequence[Entry]) -> None:
        """The follower's next page (its entries follow the last page's, in version order)."""
        if not self._open:
            return
        leader, at = self._leader, self.length
        same = leader.holds_at if isinstance(leader, StoreView) else _same_at(leader)
        for entry in page:
            if at >= len(leader) or not same(at, entry.key, entry.version):
                self._open = False
                break
            at += 1
        self.length = at

    def restart(self) -> None:
        """The follower restarted during the read: its pages start again from the first."""
        self.length = 0
        self._open = True

    def rest(self) -> Sequence[Entry]:
        """The leader's entries from the first that differs on: what the follower lacks."""
        if isinstance(self._leader, StoreView):
            return self._leader.tail(self.length)
        return self._leader[self.length :]


def _same_at(entries: Sequence[Entry]) -> Callable[[int, str, int], bool]:
    """holds_at for a plain list of entries (the leader's snapshot in the model tests)."""

    def same(index: int, key: str, version: int) -> bool:
        entry = entries[index]
        return entry.key == key and entry.version == version

    return same
