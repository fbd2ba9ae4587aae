"""`python -m kv.ha`: one node of a cluster whose leader is elected through etcd.

    NODE_NAME=n1 CLUSTER=n1=http://127.0.0.1:8000,n2=http://127.0.0.1:8001,... \\
    ETCD_ENDPOINTS=http://127.0.0.1:2379 python -m kv.ha

The node binds the host and port of its own URL in CLUSTER. Configuration is validated
before anything starts: a bad value stops the process with the variable's name.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType
from urllib.parse import urlsplit

import uvicorn

from kv.ha.node import HANode
from kv.ha.web import HAApp
from kv.network.tls import uvicorn_options
from kv.settings import HASettings, load_settings
from kv.web.limits import raise_open_file_limit
from kv.web.logs import configure_logging


class Server(uvicorn.Server):
    """uvicorn, except that SIGTERM first hands leadership over (see HANode.hand_over)."""

    def __init__(self, config: uvicorn.Config, node: HANode) -> None:
        super().__init__(config)
        self.node = node
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None and sig == signal.SIGTERM:
            self.loop.call_soon_threadsafe(self.node.begin_hand_over)
        super().handle_exit(sig, frame)


def main() -> int:
    settings = load_settings(HASettings)
    # The leader's and follower's settings are read now too, so a bad value stops the
    # node at start-up, not at its first promotion.
    try:
        settings.leader_settings()
        settings.follower_settings()
    except ValueError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings)
    raise_open_file_limit()
    # uvicorn's own lines at WARNING and up, as tools/cluster.py launches the fixed roles;
    # the node's lines (LOG_LEVEL) say more about what it does.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    node = HANode(settings)
    url = urlsplit(settings.url)
    config = uvicorn.Config(
        HAApp(node),
        host=url.hostname or "127.0.0.1",
        port=url.port or (443 if url.scheme == "https" else 80),
        log_config=None,
        access_log=False,
        lifespan="on",
        **uvicorn_options(settings),  # HTTPS with TLS_CERT_FILE (kv/network/tls.py)
    )
    Server(config, node).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
