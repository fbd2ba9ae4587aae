"""What a node keeps across roles: its store and log, its change feed, its waiting readers.

A fixed leader or follower makes its own; an HA node (kv/ha) makes one at start-up and
hands it to each role it takes, so a promotion or a step-down keeps every write, every
`/watch` stream and every reader waiting on `min_version`.
"""

from __future__ import annotations

from typing import NamedTuple

from kv.core.changes import ChangeFeed
from kv.core.requests import RequestTable
from kv.settings import NodeSettings
from kv.storage.log import Storage
from kv.web.consistency import VersionGate


class NodeState(NamedTuple):
    storage: Storage
    changes: ChangeFeed
    gate: VersionGate


def node_state(settings: NodeSettings) -> NodeState:
    return NodeState(
        Storage(
            settings.data_dir,
            settings.appendfsync,
            RequestTable(settings.idempotency_window_s, settings.idempotency_max_keys),
        ),
        ChangeFeed(settings.change_feed_entries),
        VersionGate(),
    )
