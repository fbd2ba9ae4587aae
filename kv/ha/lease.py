"""The leader's lease, as the leader itself must count it. No I/O.

etcd expires a lease TTL seconds after it *received* the last keepalive, and a little
later (its expiry check runs every 500 ms). The leader cannot know when etcd received it,
only when it was *sent*, which is earlier; so it counts from there, on a monotonic clock,
and stops `margin` sooner still. When its deadline passes it acknowledges nothing more,
whatever else it believes: a leader paused past its lease (SIGSTOP, a long GC, a VM
migration) finds on waking that its deadline has passed, before it answers anyone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LeaseClock:
    margin_s: float
    deadline: float = float("-inf")
    granted_ttl_s: int = 0
    lost_reason: str = "this node holds no lease"

    def renewed(self, sent_at: float, ttl_s: int) -> None:
        """A grant or keepalive sent at `sent_at` was answered with `ttl_s` seconds."""
        self.granted_ttl_s = ttl_s
        self.deadline = max(self.deadline, sent_at + ttl_s - self.margin_s)

    def lose(self, reason: str) -> None:
        """The lease is gone (expired in etcd, revoked, or handed over): stop at once."""
        self.deadline = float("-inf")
        self.lost_reason = reason

    def valid(self, now: float) -> bool:
        return now < self.deadline

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def refusal(self, now: float) -> str | None:
        """None while writes may be acknowledged; otherwise why not."""
        if now < self.deadline:
            return None
        if self.deadline == float("-inf"):
            return self.lost_reason
        return (
            f"this node's lease ran out {now - self.deadline:.2f} s ago without a keepalive "
            f"answered: {self.lost_reason}"
        )


def keepalive_timeout(remaining_s: float, endpoints: int, longest_s: float = 1.0) -> float:
    """How long one etcd endpoint may take to answer a keepalive.

    The etcd client tries the endpoints in turn, each for this long. With more than one, a
    member that no longer answers (cut off, or dead without a reset) may use only half of
    what is left of the lease, so the next member's answer still arrives in time: given all
    of it, a leader cut from its member let its lease lapse for a moment before it renewed
    through another, and refused writes in between. Never under 50 ms, never over
    `longest_s`."""
    share = remaining_s / 2 if endpoints > 1 else remaining_s
    return max(0.05, min(longest_s, share))
