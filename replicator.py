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
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from auth import SECRET_HEADER
from progress import Confirmation, FollowerProgress
from replication import DelayModel, FollowerState, Shipment, encode_batch, quorum_reached
from store import Entry
from transport import KeepAliveTransport

log = logging.getLogger("kvstore.replication")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A confirmed delivery of one entry to one follower."""

    follower: str
    ok: bool
    delay_ms: float
    latency_ms: float
    attempts: int


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
        clock: Clock = time.monotonic,
        max_in_flight: int = 1,
        on_confirmation: Callable[[Confirmation], None] | None = None,
    ) -> None:
        self.url = url
        self.on_confirmation = on_confirmation
        self.client = client
        self.delays = delays
        self.progress = progress
        self.clock = clock
        self.max_in_flight = max_in_flight
        self._wakeup = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._sends: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._request_template: httpx.Request | None = None

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
                self._resolve(dropped, now, ok=False)
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
            batch = self.progress.next_batch(now, self.max_in_flight)
            if batch is not None:
                self.progress.sending(batch, now)
                task = asyncio.create_task(self._ship(batch))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)
                continue
            wake = self.progress.next_wake(now, self.max_in_flight)
            if wake is not None:
                self._wake_at(wake)
            await self._wakeup.wait()

    async def _ship(self, batch: list[Shipment]) -> None:
        """Send one batch (or an empty heartbeat) and report the outcome to the progress."""
        error: str | None = None
        confirmation: Confirmation | None = None
        try:
            response = await self.client.send(self._batch_request(batch))
            if response.status_code == 200:
                body = response.json()
                confirmation = Confirmation(str(body["node_id"]), int(body["last_version"]))
            else:
                error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except (ValueError, KeyError, TypeError) as exc:
            error = f"unexpected confirmation: {exc!r}"
        finally:
            self._wakeup.set()
        now = self.clock()
        if confirmation is not None:
            self._confirm(batch, confirmation, now)
        else:
            self._fail(batch, error or "unknown error", now)

    def _batch_request(self, batch: list[Shipment]) -> httpx.Request:
        """`client.build_request` re-parses and merges the URL and headers for every batch;
        they never change, so they are prepared once (profiled: a third of httpx's cost)."""
        if self._request_template is None:
            template = self.client.build_request(
                "POST", "/replicate", headers={"content-type": "application/json"}
            )
            del template.headers["content-length"]  # each batch's is its own
            self._request_template = template
        template = self._request_template
        return httpx.Request(
            "POST",
            template.url,
            headers=template.headers,
            content=encode_batch(batch),
            extensions=template.extensions,
        )

    def _confirm(self, batch: list[Shipment], confirmation: Confirmation, now: float) -> None:
        if self.on_confirmation is not None:
            self.on_confirmation(confirmation)
        known = self.progress.node_id
        resyncs = self.progress.resyncs
        if self.progress.handle_success(batch, confirmation, now):
            log.info("follower %s is reachable again", self.url)
        if self.progress.resyncs != resyncs and known is not None:
            log.warning(
                "follower %s restarted (node %s, was %s); resyncing it with a snapshot",
                self.url,
                confirmation.node_id[:8],
                known[:8],
            )
        for shipment in batch:
            self._resolve(shipment, now, ok=True)

    def _resolve(self, shipment: Shipment, now: float, ok: bool) -> None:
        future = shipment.waiter
        if future is not None and not future.done():
            future.set_result(
                Delivery(
                    follower=self.url,
                    ok=ok,
                    delay_ms=round(shipment.delay_ms, 3),
                    latency_ms=round((now - shipment.enqueued_at) * 1000, 3),
                    attempts=shipment.attempts + 1,
                )
            )

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

    async def close(self, grace: float = 1.0) -> None:
        """Stop the loop; give batches on the wire `grace` seconds to finish."""
        if self._timer is not None:
            self._timer.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=grace)
        for task in set(self._sends):
            task.cancel()
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

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links))

    async def gather_entries(self, timeout: float = 2.0) -> tuple[list[Entry], int, int]:
        """Every entry the reachable followers hold, tombstones included, for a restarted
        leader to rebuild from: (entries, highest last_version seen, followers reached)."""

        async def fetch(link: FollowerLink) -> tuple[list[Entry], int] | None:
            try:
                # A hard deadline too: a follower that accepts but never answers (frozen)
                # must not hold up the leader's start.
                async with asyncio.timeout(timeout + 1):
                    response = await link.client.get("/replicate/entries", timeout=timeout)
                response.raise_for_status()
                body = response.json()
                entries = [
                    Entry.create(e["key"], e["value"], int(e["version"]), bool(e["deleted"]))
                    for e in body["entries"]
                ]
                return entries, int(body["last_version"])
            except (httpx.HTTPError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                log.warning("could not read %s's entries at start-up: %r", link.url, exc)
                return None

        answers = [a for a in await asyncio.gather(*map(fetch, self.links)) if a]
        entries = [entry for found, _ in answers for entry in found]
        last_version = max((version for _, version in answers), default=0)
        return entries, last_version, len(answers)

    def confirmable(self) -> int:
        """Followers whose confirmation a new write can count on: not down."""
        return sum(1 for link in self.links if link.progress.can_confirm)

    def broadcast(self, entry: Entry, started_at: float) -> list[asyncio.Future[Delivery]]:
        return [link.send(entry, started_at) for link in self.links]

    async def wait_for_quorum(
        self,
        futures: list[asyncio.Future[Delivery]],
        required: int,
        timeout: float,
    ) -> QuorumOutcome:
        """Wait until `required` futures have confirmed, or `timeout` seconds pass.

        The futures themselves are never cancelled: a delivery that misses the
        quorum still completes in its follower's loop.
        """
        pending = {future for future in futures if not future.done()}
        acks = sum(1 for future in futures if future.done() and future.result().ok)
        deadline = self.clock() + timeout
        while not quorum_reached(acks, required) and pending:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            done, pending = await asyncio.wait(
                pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            acks += sum(1 for future in done if future.result().ok)
        deliveries = [future.result() for future in futures if future.done()]
        return QuorumOutcome(required=required, deliveries=deliveries)


def follower_client(url: str, secret: str, max_connections: int) -> httpx.AsyncClient:
    """One long-lived client per follower, with a pool no larger than its in-flight cap."""
    return httpx.AsyncClient(
        base_url=url,
        headers={SECRET_HEADER: secret},
        transport=KeepAliveTransport(max_connections),
        timeout=httpx.Timeout(3.0, connect=1.0),
        trust_env=False,
    )
