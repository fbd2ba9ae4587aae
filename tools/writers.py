"""Clients that keep writing across failovers, and the check of what they were told.

Used by benchmarks/failover.py and the failover tests. Each writer sends unique keys to
whichever node it last reached, follows the followers' 307 to the leader (httpx's
`follow_redirects=True`), and moves to the next node only when one does not answer.
Every acknowledged write (200) is recorded with its version, its term, the node that
acknowledged it, and when the client heard it. The check then asks:

* is every acknowledged write on the leader now, at that version or a newer one?
* was any version acknowledged twice?
* did two nodes ever acknowledge at once? Per term, the first to last acknowledgement
  must not overlap another term's: an old leader stops before its lease can expire, and
  the next one is elected only after it has.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from kv.client import origin

RETRY_S = 0.02


@dataclass(frozen=True, slots=True)
class Ack:
    key: str
    value: int
    version: int
    term: int
    node: str
    """Where the answer came from: scheme, host and port of the node that acknowledged."""
    at: float
    """time.monotonic() when the client read the answer."""


@dataclass
class WriteLog:
    acks: list[Ack] = field(default_factory=list)
    attempts: int = 0
    errors: int = 0

    def first_ack_after(self, moment: float, not_from: str | None = None) -> Ack | None:
        """The first acknowledgement read after `moment`, from any node but `not_from` (an
        answer the old leader sent before it was killed may still be read after)."""
        later = [a for a in self.acks if a.at > moment and a.node != not_from]
        return min(later, key=lambda a: a.at) if later else None


async def write_loop(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    prefix: str,
    log: WriteLog,
    stop: asyncio.Event,
    *,
    w: int | None = None,
    timeout_ms: float = 3000,
) -> None:
    """Write `{prefix}-{n}` = n until `stop` is set; record every acknowledgement in `log`."""
    targets = itertools.cycle(urls)
    target = next(targets)
    query = {"timeout_ms": f"{timeout_ms:g}"} | ({} if w is None else {"w": str(w)})
    for n in itertools.count():
        if stop.is_set():
            return
        key = f"{prefix}-{n}"
        log.attempts += 1
        try:
            response = await client.post(
                f"{target}/keys", params=query, json={"key": key, "value": n}
            )
        except httpx.HTTPError:
            log.errors += 1
            target = next(targets)
            await asyncio.sleep(RETRY_S)
            continue
        if response.status_code == 200:
            body = response.json()
            log.acks.append(
                Ack(key, n, int(body["version"]), int(body["term"]), origin(response.url),
                    time.monotonic())
            )  # fmt: skip
            target = origin(response.url)  # the leader: go straight there next time
        elif response.status_code == 307:
            target = next(targets)  # a client that does not follow redirects: ask the next
        else:
            # A 503 (an election under way, a missed quorum) or a 307 chain that ended badly:
            # stay. The node will redirect to the leader once it knows one; moving on could
            # land on a paused leader, which costs a whole client timeout.
            log.errors += 1
            await asyncio.sleep(RETRY_S)


@dataclass
class Verdict:
    checked: int
    lost: list[str]
    duplicates: list[str]
    overlapping: list[str]

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.overlapping)

    def __str__(self) -> str:
        problems = [*self.lost, *self.duplicates, *self.overlapping]
        head = f"{self.checked} acknowledged writes checked: "
        return head + ("none lost" if not problems else "; ".join(problems[:10]))


def check(log: WriteLog, versions: dict[str, int]) -> Verdict:
    """Check the acknowledgements in `log` against the leader's `versions` (GET /state)."""
    lost = [
        f"{a.key}@{a.version} acknowledged by {a.node} is {'missing' if a.key not in versions else f'at {versions[a.key]}'}"  # noqa: E501
        for a in log.acks
        if versions.get(a.key, 0) < a.version
    ]
    seen: dict[int, Ack] = {}
    duplicates = []
    for ack in log.acks:
        if (other := seen.setdefault(ack.version, ack)) is not ack:
            duplicates.append(f"version {ack.version} acknowledged for {other.key} and {ack.key}")
    spans: dict[int, tuple[float, float, set[str]]] = {}
    for ack in log.acks:
        first, last, nodes = spans.get(ack.term, (ack.at, ack.at, set()))
        spans[ack.term] = (min(first, ack.at), max(last, ack.at), nodes | {ack.node})
    overlapping = [
        f"term {term} was acknowledged by {len(nodes)} nodes: {sorted(nodes)}"
        for term, (_, _, nodes) in spans.items()
        if len(nodes) > 1
    ]
    ordered = sorted(spans.items())
    for (term, (_, last, _)), (later, (first, _, _)) in itertools.pairwise(ordered):
        if first < last:
            overlapping.append(f"terms {term} and {later} were acknowledged at the same time")
    return Verdict(len(log.acks), lost, duplicates, overlapping)
