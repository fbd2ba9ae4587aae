"""Check-quorum: does a leader still hear from enough followers to make its write quorum? No I/O.

After etcd's raft `CheckQuorum`: a leader that has lost touch with its quorum cannot
acknowledge a write, yet while it holds the lease no one else may lead, so the store
stops for as long as the cut lasts. A leader that has heard from fewer than
WRITE_QUORUM followers for a whole window steps down and frees the lease for a node
on the majority side. Any answer counts (a confirmed batch, a heartbeat, a page of its
entries), so a loaded leader is never deposed: its followers answer all the time.
"""

from __future__ import annotations

from collections.abc import Sequence


def quorum_heard_at(heard: Sequence[float], quorum: int) -> float:
    """When the leader last heard from `quorum` followers: the quorum-th most recent answer
    among `heard` (one time per follower). +inf when no follower is needed."""
    if quorum <= 0:
        return float("inf")
    if len(heard) < quorum:
        return float("-inf")
    return sorted(heard, reverse=True)[quorum - 1]


def quorum_lost(
    heard: Sequence[float], quorum: int, now: float, window_s: float, since: float
) -> str | None:
    """Why the leader must step down, or None while it has heard from `quorum` followers
    within the last `window_s` seconds. The window opens no earlier than `since` (when the
    leader began taking writes). `window_s` 0: never."""
    if window_s <= 0:
        return None
    at = max(quorum_heard_at(heard, quorum), since)
    if now - at <= window_s:
        return None
    recent = sum(1 for h in heard if now - h <= window_s)
    return (
        f"check-quorum: heard from only {recent} of the {quorum} followers WRITE_QUORUM needs "
        f"in the last {window_s * 1000:g} ms"
    )
