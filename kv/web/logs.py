"""Logging for both roles: every line names its node, as text or JSON, and the app owns its
access log.

Six nodes on one terminal (or one `docker compose logs`) are unreadable unless each line
says which node wrote it, so one handler on the root logger stamps every record with the
node's name, uvicorn's own lines included (its loggers are pointed at that handler).

uvicorn's access log formats a line per request even at 2,000 requests a second: launched
as the docs say, the leader measured 1,219 writes/s with it against 2,688 without. The
app therefore turns it off and logs requests itself (ACCESS_LOG): `sampled` (the default)
writes every 100th request and every 5xx (but a probe's 503), `on` every request, `off` none.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kv.settings import AccessLogMode, NodeSettings
from kv.web.access import warn_if_open

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(node)s] %(name)s: %(message)s"
SAMPLE_EVERY = 100
PROBES = frozenset({"/health", "/ready", "/primary", "/ha", "/metrics"})
"""A 503 from /ready or /primary is an answer, not a failure: probes are only sampled."""

access_log = logging.getLogger("kvstore.access")


class NodeName(logging.Filter):
    """Stamps each record with the node's name, for the formatters."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.node = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, node, logger, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "node": getattr(record, "node", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(settings: NodeSettings) -> None:
    """One stderr handler on the root logger, for this node's and uvicorn's lines alike."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(NodeName(settings.name))
    handler.setFormatter(
        JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # No handler and no propagation: uvicorn checks hasHandlers() per connection and then
    # skips its access log entirely, formatting included.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers = []
    uvicorn_access.propagate = False
    # httpx logs every request at INFO: one line per replicated batch is noise, and costs CPU.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if settings.uses_development_secret:
        logging.getLogger("kvstore").warning(
            "REPLICATION_SECRET is the development value on %s; set your own before "
            "exposing this node to any network",
            settings.name,
        )
    warn_if_open(settings, settings.bind_host)


class AccessLog:
    """A pure ASGI middleware: one line per logged request, with its status and duration."""

    def __init__(self, app: ASGIApp, *, every: int) -> None:
        self.app = app
        self.every = every
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.requests += 1
        sampled = self.requests % self.every == 0
        started = time.perf_counter()
        status = 500  # if the app raises before it answers

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            if sampled or (status >= 500 and scope["path"] not in PROBES):
                client = scope.get("client")
                access_log.info(
                    '%s "%s %s" %d %.1f ms',
                    f"{client[0]}:{client[1]}" if client else "-",
                    scope["method"],
                    scope["path"],
                    status,
                    (time.perf_counter() - started) * 1000,
                )


def install_access_log(app: Any, mode: AccessLogMode) -> None:
    """Add the access log for ACCESS_LOG=on or sampled; `off` adds nothing to a request."""
    if mode is AccessLogMode.ON:
        app.add_middleware(AccessLog, every=1)
    elif mode is AccessLogMode.SAMPLED:
        app.add_middleware(AccessLog, every=SAMPLE_EVERY)
