"""Ending endless streams when the node stops, so that no client can keep it running.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections, then waits for every response
under way to finish before it shuts the app down, with no deadline unless it was given
one. A `GET /watch` stream never finishes by itself: one client holding it open would keep
the node from exiting until it is killed. So a :class:`Drain` knows the streams an app
serves, and the signal tells each to end now with a final event saying why. A stream still
open `deadline_s` later (its client does not read, so even the final event cannot be
written) is cut, and its connection dropped (:func:`abort_connections`).

The signal reaches the drain in front of uvicorn's own handler: a drain's first stream
(:func:`stop_on_signals`) chains a handler before whatever handles SIGTERM and SIGINT then
(uvicorn's, or `python -m kv.ha`'s, which hands leadership over first), and that handler
calls it afterwards, so uvicorn's shutdown goes on as before. Nothing is chained where
nothing handles the signal: the default handler ends the process at once, with nothing to
drain. Signals belong to the process, so the drains that a signal begins are the
process's: every app's that is alive (an HA node builds one app per role it takes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("kvstore")

DEADLINE_S = 2.0
"""How long a stream may take to send its final event once the node is stopping."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Stop = Callable[[str], None]
"""Tells one stream to end with a final event giving the reason; it must not block."""
Client = tuple[Any, ...] | None
"""A stream's client address, as uvicorn names its connection: (host, port)."""


class Drain:
    """The streams an app serves now, and their end when the node stops."""

    def __init__(self, deadline_s: float = DEADLINE_S) -> None:
        self.deadline_s = deadline_s
        self.reason: str | None = None
        """Why the node is stopping; None while it is not."""
        self.cut = 0
        """Streams ended at the deadline rather than by their final event."""
        self._streams: dict[asyncio.Task[None], tuple[Stop, Client]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None

    @property
    def open(self) -> int:
        return len(self._streams)

    def begin(self, reason: str, server: uvicorn.Server | None = None) -> None:
        """Tell every stream to end now with `reason`; cut those open after the deadline
        (and drop their connections, if `server` is the uvicorn serving them)."""
        if self.reason is not None:
            return
        self.reason = reason
        self._server = server
        for stop, _ in list(self._streams.values()):
            stop(reason)
        if self._streams:
            log.info("the node is stopping: ending %d stream(s)", len(self._streams))
            asyncio.get_running_loop().call_later(self.deadline_s, self._cut)

    def begin_from_signal(self, reason: str, server: uvicorn.Server | None) -> None:
        """`begin` from a signal handler, which may run anywhere in the loop's code."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self.begin, reason, server)

    def _cut(self) -> None:
        if not self._streams:
            return
        self.cut += len(self._streams)
        log.warning(
            "cut %d stream(s) whose client had not taken the final event %g s after the node "
            "began stopping",
            len(self._streams),
            self.deadline_s,
        )
        abort_connections(self._server, {client for _, client in self._streams.values()})
        for task in list(self._streams):
            task.cancel()

    def _track(self, task: asyncio.Task[None], stop: Stop, client: Client) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            stop_on_signals(self)
        self._streams[task] = (stop, client)
        if self.reason is not None:  # a stream that began after the signal ends at once
            stop(self.reason)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._streams.pop(task, None)


class DrainedStream(StreamingResponse):
    """A StreamingResponse its drain can end: `stop(reason)` asks the stream to send its
    final event and finish; past the drain's deadline it is cut instead."""

    def __init__(self, content: Any, drain: Drain, stop: Stop, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.drain = drain
        self.stop = stop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # In a task of its own, so that a cut (cancelling it) ends this call normally,
        # not with a traceback in uvicorn's log.
        task = asyncio.ensure_future(super().__call__(scope, receive, send))
        client = scope.get("client")
        self.drain._track(task, self.stop, tuple(client) if client else None)
        try:
            await asyncio.wait({task})
        finally:
            self.drain._forget(task)
            task.cancel()  # if this call itself was cancelled; else it is done already
            if not task.done():
                await asyncio.wait({task})
            # A stream cut while it waited to send is left suspended: close it now, so that
            # its own cleanup (a watcher unsubscribing) runs at once, not when collected.
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if not task.cancelled():
            task.result()  # the stream's own error (a client gone), as without the drain


_drains: weakref.WeakSet[Drain] = weakref.WeakSet()


class _Chained:
    """A signal handler that begins every drain, then runs the handler it replaced."""

    def __init__(self, previous: Callable[[int, FrameType | None], Any]) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> Any:
        reason = f"the node is stopping ({signal.Signals(signum).name})"
        # uvicorn's handler is its Server's method: the server whose connections a cut drops.
        server = getattr(self.previous, "__self__", None)
        if not isinstance(server, uvicorn.Server):
            server = None
        for drain in list(_drains):
            drain.begin_from_signal(reason, server)
        return self.previous(signum, frame)


def abort_connections(server: uvicorn.Server | None, clients: set[Client]) -> int:
    """Drop `server`'s connections to `clients` at once, with what is buffered for them;
    how many. Closing one is not enough: asyncio closes a socket only once what it has to
    write is written, which a client that reads nothing never lets happen, and uvicorn
    waits for every connection to close before it exits (unless it was given
    --timeout-graceful-shutdown, which would cut every other request too)."""
    if server is None:
        return 0
    dropped = 0
    for connection in list(server.server_state.connections):
        transport = getattr(connection, "transport", None)
        if getattr(connection, "client", None) in clients and transport is not None:
            transport.abort()
            dropped += 1
    return dropped


def stop_on_signals(drain: Drain) -> None:
    """Begin `drain` on SIGTERM and SIGINT, in front of the handlers installed now."""
    _drains.add(drain)
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; a server elsewhere has none
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if callable(current) and not isinstance(current, _Chained):
            signal.signal(signum, _Chained(current))
