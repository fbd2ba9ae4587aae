"""The leader's replication I/O: one delivery loop per follower, and the quorum wait.

Everything that decides *what* to ship lives in :mod:`replication`; this module
only moves bytes. Each follower has one long-lived :class:`httpx.AsyncClient`
with a small connection pool, and one loop that ships every ready entry in one
`POST /replicate` (group commit), with at most `max_in_flight` batches on the
wire. Every write gets one future per follower; :meth:`Replicator.wait_for_quorum`
counts them with ``asyncio.wait(..., FIRST_COMPLETED)`` and returns as soon as
enough have confirmed. Deliveries still outstanding carry on in the loops: they
are held by the outbox, never cancelled, and retried until the follower confirms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson

from kv.core.outbox import DelayModel, Shipment, encode_batch, quorum_reached, retry_backoff
from kv.core.progress import Confirmation, FollowerProgress, FollowerState
from kv.core.records import Entry
from kv.core.startup import StartupMerge, TermTooLowError
from kv.core.store import fingerprint
from kv.network.transport import KeepAliveTransport
from kv.web.auth import SECRET_HEADER
from kv.web.schemas import PAGE_LINES

log = logging.getLogger("kvstore.replication")

Clock = Callable[[], float]
PAGE_LIMIT = 10_000
PAGE_TIMEOUT_S = 10.0
LATE_PAGE_LIMIT = 1_000
"""Entries per page when a leader that is taking writes reads a late follower: parsing,
comparing (CommonPrefix) and merging a page holds the event loop, about 4 ms for 2,000
entries and 2 ms for 1,000. Measured with benchmarks/million.py, 1,000 read a million
entries faster than 2,000 or 500 (4.7-4.9 s against 5.2-5.5 and 6.3-6.7) and the write
p99 meanwhile was 10 ms against 14-19 at 2,000."""
STALL_S = 1.0
"""A start-up read with no page for this long is stalled: another follower is read too."""
"""Each page of a follower's entries must arrive within this; the whole store may take longer."""
BATCH_TIMEOUT_S = 5.0
"""A data batch (up to 4 MiB) must be answered within this. Noticing a follower that stopped
answering is the heartbeats' job, with their own, much shorter timeout (HEARTBEAT_TIMEOUT_MS)."""
CONNECT_TIMEOUT_S = 1.0


class LeaderHooks(Protocol):
    """What a delivery loop needs from the leader beyond its follower: its term, and merging."""

    @property
    def term(self) -> int: ...

    @property
    def leader_id(self) -> str: ...

    @property
    def last_version(self) -> int: ...

    def observe_term(self, term: int, foreign: bool = False) -> None:
        """A follower has seen `term` (`foreign`: begun by another leader): begin a newer one
        if ours is not newer."""

    def merge(self, entries: list[Entry]) -> None:
        """Merge a page of a late follower's entries into the leader's store."""

    def in_sync(self, print_: int) -> bool:
        """Whether a follower whose entries have this fingerprint holds what the leader does."""

    def delivered(self, delivery: Delivery, entry: Entry) -> None:
        """A write a client waits for was confirmed (or will not be) by one follower."""


@dataclass(frozen=True, slots=True)
class PulledFollower:
    node_id: str
    term: int
    last_version: int
    fingerprint: int
    entries: int


READ_ERRORS = (httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError)
"""What reading a follower can raise: the network, or a body that is not what was expected."""


class Fenced(Exception):
    """The follower refused a read: it has seen a term newer than (or another leader's) ours."""

    def __init__(self, follower_term: int, message: str) -> None:
        super().__init__(message)
        self.follower_term = follower_term


async def read_page(
    client: httpx.AsyncClient,
    after: int,
    limit: int,
    *,
    leader_id: str,
    term: int | None,
    timeout: float,
) -> dict[str, Any]:
    """One page of a follower's entries, read by the leader `leader_id` (of `term`, if it has
    begun one): naming the leader fences the follower before it answers, so nothing an older
    leader left on the wire can land after this read. Raises Fenced on a 409."""
    fence = {"leader_id": leader_id} | ({} if term is None else {"term": term})
    async with asyncio.timeout(timeout + 1):  # also when it accepts but never answers
        response = await client.get(
            "/replicate/entries",
            params={"after_version": after, "limit": limit, "format": "lines", **fence},
            timeout=timeout,
        )
    if response.status_code == 409:
        body = response.json()
        raise Fenced(int(body["follower_term"]), str(body["error"]))
    response.raise_for_status()
    return parse_page(response.headers.get("content-type", ""), response.content)


def parse_page(content_type: str, body: bytes) -> dict[str, Any]:
    """A page's fields, its `entries` made into entries.

    In lines (what this leader asks for), each entry keeps its own bytes as its JSON
    (:meth:`Entry.from_wire`): a million entries are never decoded and encoded again. A
    follower that answers in plain JSON (one older than `format=lines`) is read with the
    json module, not orjson, which reads an integer past 64 bits as a float: a value must
    come back exactly as it was written."""
    if content_type.startswith(PAGE_LINES):
        head, _, rest = body.partition(b"\n")
        page: dict[str, Any] = orjson.loads(head)
        page["entries"] = [Entry.from_wire(line) for line in rest.split(b"\n") if line]
        return page
    page = json.loads(body)
    page["entries"] = [Entry.from_json(e) for e in page["entries"]]
    return page


async def pull_entries(
    client: httpx.AsyncClient,
    on_page: Callable[[list[Entry]], None],
    *,
    leader_id: str,
    term: int | None = None,
    page_limit: int = PAGE_LIMIT,
    page_timeout: float = PAGE_TIMEOUT_S,
    on_restart: Callable[[], None] | None = None,
) -> PulledFollower:
    """Read every entry a follower holds, page by page in version order.

    Each page has its own deadline, so a large store takes as long as it takes while a
    frozen follower is given up on within `page_timeout`. If the follower restarts
    part-way (its node_id changes), `on_restart` is called and reading starts again from
    the first page (the pages merged so far were real entries, and stay merged).
    """
    after = 0
    node_id: str | None = None
    digest = count = 0
    while True:
        body = await read_page(
            client, after, page_limit, leader_id=leader_id, term=term, timeout=page_timeout
        )
        if node_id is not None and body["node_id"] != node_id:
            after, digest, count, node_id = 0, 0, 0, None  # what was read may be gone
            if on_restart is not None:
                on_restart()
            continue
        node_id = str(body["node_id"])
        entries: list[Entry] = body["entries"]
        on_page(entries)
        digest ^= fingerprint(entries)
        count += len(entries)
        if body["next_after"] is None:
            return PulledFollower(
                node_id, int(body["term"]), int(body["last_version"]), digest, count
            )
        after = int(body["next_after"])


@dataclass(frozen=True, slots=True)
class Delivery:
    """A confirmed delivery of one entry to one follower (or why it will not be confirmed)."""

    follower: str
    ok: bool
    delay_ms: float
    latency_ms: float
    attempts: int
    error: str | None = None


OVERFLOWED = "the follower's replication queue overflowed (MAX_REPLICATION_QUEUE)"
CONFLICT = "the follower holds another write under this version"


@dataclass(frozen=True, slots=True)
class QuorumOutcome:
    required: int
    deliveries: list[Delivery]

    @property
    def acks(self) -> int:
        return sum(1 for delivery in self.deliveries if delivery.ok)

    @property
    def reached(self) -> bool:
        return quorum_reached(self.acks, self.required)


class FollowerLink:
    """The leader's connection to one follower: its progress, client and delivery loop."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        delays: DelayModel,
        progress: FollowerProgress,
        *,
        leader: LeaderHooks,
        clock: Clock = time.monotonic,
        max_in_flight: int = 1,
        heartbeat_timeout: float = 0.5,
    ) -> None:
        self.url = url
        self.leader = leader
        self.client = client
        self.delays = delays
        self.progress = progress
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.heartbeat_timeout = heartbeat_timeout
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._sends: dict[asyncio.Task[None], list[Shipment]] = {}  # batches on the wire
        self._loop_task: asyncio.Task[None] | None = None
        self._pull_task: asyncio.Task[None] | None = None
        self._templates: dict[bool, httpx.Request] = {}

    @property
    def state(self) -> FollowerState:
        return self.progress.state(self.clock())

    # -- the write path ----------------------------------------------------

    def send(self, entry: Entry, started_at: float) -> asyncio.Future[Delivery]:
        """Queue `entry` for this follower; the future resolves when the follower confirms it.

        It resolves with ok=False if the entry will reach the follower only inside a
        snapshot (the follower's backlog overflowed), since that is not a confirmation.
        """
        future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        delay_ms = self.delays.draw_ms()
        ready_at = started_at + delay_ms / 1000
        shipment = Shipment(entry, delay_ms, started_at, ready_at, waiter=future)
        undeliverable = self.progress.queue(shipment)
        if undeliverable:
            log.warning(
                "follower %s has %d entries queued (MAX_REPLICATION_QUEUE); dropped them and "
                "queued a snapshot of the store instead",
                self.url,
                len(undeliverable),
            )
            now = self.clock()
            for dropped in undeliverable:
                self._resolve(dropped, now, ok=False, error=OVERFLOWED)
            ready_at = now
        self._wake_at(ready_at)
        return future

    def _wake_at(self, when: float) -> None:
        if when <= self.clock():
            self._wakeup.set()
        elif when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            # The clock is monotonic like the loop's, but not necessarily the same origin.
            self._timer = loop.call_later(when - self.clock(), self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._wakeup.set()

    # -- the delivery loop -------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"deliver-to-{self.url}")

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            now = self.clock()
            if self.progress.wants_pull(now) and self._pull_task is None:
                self._pull_task = asyncio.create_task(self._pull())
            batch = self.progress.next_batch(now, self.max_in_flight)
            if batch is not None:
                through = self.progress.sending(batch, now, self.leader.last_version)
                task = asyncio.create_task(self._ship(batch, through))
                self._sends[task] = batch
                task.add_done_callback(self._sent)
                continue
            wake = self.progress.next_wake(now, self.max_in_flight)
            if wake is not None:
                self._wake_at(wake)
            await self._wakeup.wait()

    async def _pull(self) -> None:
        """Read a late (or restarted) follower's entries into the leader, then resync it
        with what it lacks."""
        prefix = self.progress.begin_pull()

        def on_page(entries: list[Entry]) -> None:
            prefix.read(entries)  # before the merge, which may change what the leader holds
            self.leader.merge(entries)

        try:
            pulled = await pull_entries(
                self.client,
                on_page,
                leader_id=self.leader.leader_id,
                term=self.leader.term,
                page_limit=LATE_PAGE_LIMIT,
                on_restart=prefix.restart,
            )
        except Fenced as exc:
            self.leader.observe_term(exc.follower_term, foreign=True)  # then read it again
            log.warning("%s refused term %d (%s)", self.url, self.leader.term, exc)
        except READ_ERRORS as exc:
            backoff = self.progress.handle_pull_failure(self.clock(), describe(exc))
            log.warning("reading %s's entries failed (%s); retrying in %.0f ms",
                        self.url, describe(exc), backoff * 1000)  # fmt: skip
        else:
            self.leader.observe_term(pulled.term)
            in_sync = self.leader.in_sync(pulled.fingerprint)
            self.progress.handle_pulled(pulled.node_id, in_sync, self.clock(), prefix)
            log.info(
                "read %d entries from %s (node %s, term %d); %s",
                pulled.entries, self.url, pulled.node_id[:8], pulled.term,
                "it holds what the leader holds" if in_sync else
                f"resyncing it with {self.progress.outbox.snapshot_left} of the leader's entries, "
                "from the first that differs on",
            )  # fmt: skip
        finally:
            self._pull_task = None
            self._wakeup.set()

    async def _ship(self, batch: list[Shipment], through: int = 0) -> None:
        """Send one batch (or an empty heartbeat) and report the outcome to the progress."""
        error: str | None = None
        confirmation: Confirmation | None = None
        unconfirmed: set[int] = set()
        fenced_by: int | None = None
        try:
            response = await self.client.send(self._batch_request(batch, through))
            if response.status_code == 200:
                body = response.json()
                confirmation = Confirmation(str(body["node_id"]), int(body["last_version"]))
                unconfirmed = set(body.get("unconfirmed") or ())
            elif response.status_code == 409:
                refusal = response.json()
                fenced_by = int(refusal["follower_term"])
                error = f"HTTP 409: {refusal['error']}"
            else:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = describe(exc, self.heartbeat_timeout if not batch else BATCH_TIMEOUT_S)
        except (ValueError, KeyError, TypeError) as exc:
            error = f"unexpected confirmation: {exc!r}"
        finally:
            self._wakeup.set()
        now = self.clock()
        if confirmation is not None:
            self._confirm(batch, confirmation, unconfirmed, now)
        elif fenced_by is not None:
            self.leader.observe_term(fenced_by, foreign=True)
            self.progress.handle_fenced(batch, now, error or "fenced")
            log.warning("%s refused term %d (%s); reading its entries", self.url,
                        self.leader.term, error)  # fmt: skip
        else:
            self._fail(batch, error or "unknown error", now)

    def _batch_request(self, batch: list[Shipment], through: int = 0) -> httpx.Request:
        """`client.build_request` re-parses and merges the URL and headers for every batch;
        they never change, so they are prepared once per kind (profiled: a third of httpx's
        cost). A heartbeat (an empty batch) carries its own, short timeout."""
        heartbeat = not batch
        if (template := self._templates.get(heartbeat)) is None:
            timeout = self.heartbeat_timeout if heartbeat else BATCH_TIMEOUT_S
            template = self.client.build_request(
                "POST",
                "/replicate",
                headers={"content-type": "application/json"},
                timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            )
            del template.headers["content-length"]  # each batch's is its own
            self._templates[heartbeat] = template
        return httpx.Request(
            "POST",
            template.url,
            headers=template.headers,
            content=encode_batch(
                batch,
                self.leader.term,
                self.leader.leader_id,
                through,
                self.progress.merged_node_id,
            ),
            extensions=template.extensions,
        )

    def _confirm(
        self, batch: list[Shipment], confirmation: Confirmation, unconfirmed: set[int], now: float
    ) -> None:
        known = self.progress.node_id
        if self.progress.handle_success(batch, confirmation, now):
            log.info("follower %s is reachable again", self.url)
        if known is not None and known != confirmation.node_id:
            log.warning(
                "follower %s restarted (node %s, was %s); reading its entries",
                self.url,
                confirmation.node_id[:8],
                known[:8],
            )
        if unconfirmed:
            self.progress.handle_conflict()
            log.warning("%s holds other writes under %d version(s) sent; reading its entries",
                        self.url, len(unconfirmed))  # fmt: skip
        for shipment in batch:
            if shipment.entry.version in unconfirmed:
                self._resolve(shipment, now, ok=False, error=CONFLICT)
            else:
                self._resolve(shipment, now, ok=True)

    def _resolve(self, shipment: Shipment, now: float, ok: bool, error: str | None = None) -> None:
        future = shipment.waiter
        if future is not None and not future.done():
            delivery = Delivery(
                follower=self.url,
                ok=ok,
                delay_ms=round(shipment.delay_ms, 3),
                latency_ms=round((now - shipment.enqueued_at) * 1000, 3),
                attempts=shipment.attempts + 1,
                error=error,
            )
            future.set_result(delivery)
            self.leader.delivered(delivery, shipment.entry)

    def _fail(self, batch: list[Shipment], error: str, now: float) -> None:
        backoff = self.progress.handle_failure(batch, now, error)
        failures = self.progress.consecutive_failures
        log.log(
            logging.WARNING if failures in (1, 10) else logging.DEBUG,
            "%s to %s failed (%s); retrying in %.0f ms",
            f"delivery of {len(batch)} entries" if batch else "heartbeat",
            self.url,
            error,
            backoff * 1000,
        )

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sends.pop(task, None)

    async def close(self, reason: str = "the leader is shutting down", grace: float = 1.0) -> None:
        """Stop the loop; give batches on the wire `grace` seconds to finish. A write still
        waiting for this follower is answered at once, unconfirmed, with `reason`."""
        if self._timer is not None:
            self._timer.cancel()
        for task in (self._loop_task, self._pull_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        now = self.clock()
        for shipment in self.progress.outbox.drain():
            self._resolve(shipment, now, ok=False, error=reason)
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=grace)
        for task, batch in list(self._sends.items()):
            task.cancel()
            for shipment in batch:
                self._resolve(shipment, now, ok=False, error=reason)
        await asyncio.gather(*self._sends, return_exceptions=True)
        await self.client.aclose()


class Replicator:
    """Fans each write out to every follower and waits for a quorum of them."""

    def __init__(self, links: Sequence[FollowerLink], clock: Clock = time.monotonic) -> None:
        self.links = list(links)
        self.clock = clock

    def start(self) -> None:
        for link in self.links:
            link.start()

    async def close(self, reason: str = "the leader is shutting down") -> None:
        await asyncio.gather(*(link.close(reason) for link in self.links))

    async def gather(
        self,
        merge: StartupMerge,
        *,
        leader_id: str,
        page_limit: int = PAGE_LIMIT,
        page_timeout: float = PAGE_TIMEOUT_S,
    ) -> int:
        """Read followers' entries into `merge`, then record the new term on them; return it.

        Round after round: read followers (retrying failures with backoff) until the
        quorum is read, choose a term above everything read, and claim it on the
        followers read. A follower that fails its claim is read again later. Once
        the quorum holds the term, the rest are left to their delivery loops, which
        read them as late followers.
        """

        progress: dict[str, float] = {}

        def merge_page(url: str, page: list[Entry]) -> None:
            progress[url] = merge.progressed_at = time.monotonic()
            merge.merge_page(url, page)

        async def read(link: FollowerLink) -> None:
            failures = 0
            progress[link.url] = time.monotonic()
            while True:
                try:
                    pulled = await pull_entries(
                        link.client,
                        lambda page: merge_page(link.url, page),
                        leader_id=leader_id,
                        term=merge.granted_term,  # known already when elected: it fences
                        page_limit=page_limit,
                        page_timeout=page_timeout,
                        on_restart=lambda: merge.abandon(link.url),
                    )
                except (
                    Fenced,
                    httpx.HTTPError,
                    TimeoutError,
                    ValueError,
                    KeyError,
                    TypeError,
                ) as exc:
                    merge.abandon(link.url)
                    if isinstance(exc, Fenced):
                        merge.observe(exc.follower_term)
                        granted = merge.granted_term
                        if granted is not None and exc.follower_term >= granted:
                            raise TermTooLowError(granted, merge.new_term()) from exc
                    failures += 1
                    log.log(
                        logging.WARNING if failures in (1, 10) else logging.DEBUG,
                        "start-up: could not read %s's entries (%s); retrying",
                        link.url, describe(exc),
                    )  # fmt: skip
                    await asyncio.sleep(retry_backoff(failures))
                    continue
                merge.finish(link.url, pulled.node_id, pulled.term, pulled.last_version)
                merge.progressed_at = time.monotonic()
                log.info(
                    "start-up: read %d entries from %s (term %d); %d of %d needed",
                    pulled.entries, link.url, pulled.term, merge.heard, merge.quorum,
                )  # fmt: skip
                return

        async def claim(link: FollowerLink, term: int) -> None:
            try:
                await read_page(
                    link.client, 0, 1, leader_id=leader_id, term=term, timeout=page_timeout
                )
                merge.claimed(link.url, term)
                merge.progressed_at = time.monotonic()
            except Fenced as exc:
                merge.observe(exc.follower_term)
                merge.forget(link.url)
            except READ_ERRORS as exc:
                log.warning("start-up: could not record term %d on %s (%s)",
                            term, link.url, describe(exc))  # fmt: skip
                merge.forget(link.url)

        while True:
            # Read as many followers as the quorum needs, and one more whenever a read
            # stalls (no page for STALL_S: the follower is down or frozen). Reading every
            # follower at once would merge every store, though all but the quorum's are
            # cancelled at the end: with a million keys each, twice the work.
            waiting = [link for link in self.links if link.url not in merge.reports]
            tasks: dict[asyncio.Task[None], FollowerLink] = {}
            try:
                while waiting or tasks:
                    now = time.monotonic()
                    stalled = sum(
                        1 for link in tasks.values() if now - progress[link.url] > STALL_S
                    )
                    wanted = merge.quorum - merge.heard + stalled
                    while waiting and len(tasks) < wanted:
                        link = waiting.pop(0)
                        tasks[asyncio.create_task(read(link))] = link
                    if merge.read_enough or not tasks:
                        break
                    done, _ = await asyncio.wait(
                        tasks, timeout=STALL_S, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        del tasks[task]
                        if (error := task.exception()) is not None:
                            raise error  # a newer term is needed (TermTooLowError)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            term = merge.choose_term()
            unclaimed = [
                link
                for link in self.links
                if link.url in merge.reports and link.url not in merge.claims
            ]
            await asyncio.gather(*(claim(link, term) for link in unclaimed))
            if merge.ready:
                return term

    def confirmable(self) -> int:
        """Followers whose confirmation a new write can count on: not down."""
        return sum(1 for link in self.links if link.progress.can_confirm)

    def broadcast(self, entry: Entry, started_at: float) -> list[asyncio.Future[Delivery]]:
        return [link.send(entry, started_at) for link in self.links]


def describe(exc: BaseException, timeout: float = PAGE_TIMEOUT_S) -> str:
    """What went wrong, in the words an operator reads in /health: "no answer within 500 ms"."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return describe_timeout(exc, timeout)
    refused = isinstance(exc.__cause__, ConnectionRefusedError) or "refused" in str(exc).lower()
    if isinstance(exc, httpx.ConnectError) and refused:
        return "connection refused: is the follower running?"
    if str(exc) and str(exc) != type(exc).__name__:
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def describe_timeout(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {min(timeout, CONNECT_TIMEOUT_S) * 1000:g} ms"
    if isinstance(exc, httpx.PoolTimeout):
        return f"no free connection within {timeout * 1000:g} ms"
    return f"no answer within {timeout * 1000:g} ms"


def follower_client(
    url: str, secret: str, max_in_flight: int, tls: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """One long-lived client per follower: a connection per data batch on the wire (one
    more during a snapshot, see FollowerProgress), and one more, so a heartbeat never waits
    behind a batch. `tls`: the CA to verify an https:// follower against, and the
    certificate to present to it (kv/network/tls.py)."""
    return httpx.AsyncClient(
        base_url=url,
        headers={SECRET_HEADER: secret},
        transport=KeepAliveTransport(max_in_flight + 2, tls),
        timeout=httpx.Timeout(BATCH_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        trust_env=False,
    )
