"""The nemesis in the partition lab: about 50 s of random faults, then every check.

`tools/nemesis.py --net` with a fixed seed: five HA nodes and a three-member etcd, each in
a namespace of its own; partitions (cuts, one-way cuts, isolation, a node cut from etcd
or from one member), wipes, etcd member kills, SIGKILL and SIGSTOP, one at a time and each
healed. The history must be linearizable per key and break none of the store's
invariants. KV_NEMESIS_NET_SECONDS and KV_NEMESIS_NET_SEED change the run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.partition.conftest import assert_nothing_left, node_root, require_namespaces
from tools.history import read_ours
from tools.linearizability import Verdict
from tools.nemesis_net import (
    NET_FAULTS,
    invariants,
    linearizable,
    net_summary,
    run_net,
    write_history,
)

SECONDS = float(os.environ.get("KV_NEMESIS_NET_SECONDS", "30"))
SEED = int(os.environ.get("KV_NEMESIS_NET_SEED", "20261122"))
NETWORK_FAULTS = set(NET_FAULTS[:5])


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 170)
async def test_random_partitions_and_crashes_keep_the_history_linearizable(tmp_path: Path):
    require_namespaces()
    run = await run_net(SECONDS, SEED, tmp_path, root=node_root())
    assert_nothing_left(run.prefix)
    path = write_history(run, export_edn=True)
    result = linearizable(run, timeout=60)
    anomalies, checked = invariants(run)
    print("\n" + net_summary(run, result, anomalies, checked, SEED, SECONDS))
    print(f"history: {path}")
    assert len(read_ours(path).events) == len(run.recorder.history().events)
    assert (tmp_path / "history.edn").stat().st_size > 0
    assert len(run.faults) >= SECONDS / 12, "the nemesis injected faults"
    assert {f.kind for f in run.faults} & NETWORK_FAULTS, "some of them partitions"
    assert checked > 100, "enough acknowledged writes to say something"
    assert sum(1 for e in run.recorder.history().events if e.type == "ok") > 500
    assert result.verdict is Verdict.OK, result.failures[0].report() if result.failures else ""
    assert anomalies == []
