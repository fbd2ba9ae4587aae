"""Writers during a fault: tools/writers.py's write_loop, with two client-side behaviours.

write_loop stays on a node that answers 503, which is right when the node will redirect
once it knows the new leader, but a node cut off from etcd never will, and a client next
to it would wait forever. These writers behave as a client behind a load balancer that
checks `/primary` would: a write answered 503 makes the writer move on to the next node.
That is done in the transport (the seam httpx gives for it), so write_loop is used as it is.
The same transport paces the requests, so that a soak can run at a chosen rate.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import httpx

from tools.writers import Ack, WriteLog, write_loop


class Unavailable(httpx.TransportError):
    """A node answered a write with 503: to write_loop, a node that did not answer."""


class MoveOn503(httpx.AsyncBaseTransport):
    """Turn a 503 to a write into :class:`Unavailable`, and space requests `interval_s`
    apart (0: as fast as they are answered)."""

    def __init__(self, interval_s: float = 0.0) -> None:
        self.inner = httpx.AsyncHTTPTransport(retries=0)
        self.interval_s = interval_s
        self._next = 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.interval_s > 0:
            now = time.monotonic()
            await asyncio.sleep(max(0.0, self._next - now))
            self._next = max(now, self._next) + self.interval_s
        response = await self.inner.handle_async_request(request)
        if response.status_code == 503 and request.method != "GET":
            await response.aread()
            await response.aclose()
            raise Unavailable(f"{request.url.host} answered 503", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Load:
    """`writers` write loops over `urls`, stopped by :meth:`finish` or after `max_s`.

    `rate`: writes a second in all (None: each writer as fast as it is answered).
    """

    def __init__(
        self,
        urls: Sequence[str],
        prefix: str,
        writers: int = 3,
        *,
        rate: float | None = None,
        max_s: float = 120.0,
        timeout_ms: float = 1000,
    ) -> None:
        self.log = WriteLog()
        self.stop = asyncio.Event()
        interval = 0.0 if rate is None else writers / rate
        self.clients = [
            httpx.AsyncClient(
                transport=MoveOn503(interval),
                timeout=timeout_ms / 1000 + 2,
                follow_redirects=True,
                trust_env=False,
            )
            for _ in range(writers)
        ]
        # Each writer starts on a different node, so they do not all probe the same one.
        self.tasks = [
            asyncio.create_task(
                write_loop(
                    client,
                    [*urls[i % len(urls) :], *urls[: i % len(urls)]],
                    f"{prefix}{i}",
                    self.log,
                    self.stop,
                    timeout_ms=timeout_ms,
                )
            )
            for i, client in enumerate(self.clients)
        ]
        self._deadline = asyncio.get_running_loop().call_later(max_s, self.stop.set)

    def acks(self, after: float = 0.0, nodes: Sequence[str] | None = None) -> list[Ack]:
        """Acknowledgements read after `after`, from the node URLs in `nodes` (None: any)."""
        return [
            ack for ack in self.log.acks if ack.at > after and (nodes is None or ack.node in nodes)
        ]

    async def wait_acks(
        self,
        after: float,
        count: int = 1,
        timeout: float = 10.0,
        nodes: Sequence[str] | None = None,
    ) -> float | None:
        """Wait up to `timeout` for `count` acknowledgements after `after` from `nodes`;
        seconds from `after` to the first of them, None if too few came."""
        deadline = time.monotonic() + timeout
        while len(self.acks(after, nodes)) < count:
            if self.stop.is_set() or time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.01)
        return min(a.at for a in self.acks(after, nodes)) - after

    def max_gap(self, start: float, end: float) -> float:
        """The longest time between two acknowledgements (or the window's ends) in
        [start, end]: how long clients heard nothing."""
        moments = [start, *sorted(a.at for a in self.log.acks if start < a.at < end), end]
        return max(b - a for a, b in itertools.pairwise(moments))

    async def finish(self) -> None:
        self.stop.set()
        self._deadline.cancel()
        await asyncio.gather(*self.tasks)
        for client in self.clients:
            await client.aclose()
