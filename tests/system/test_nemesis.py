"""The nemesis, short: about a minute of random faults against real processes, then the checker.

`make nemesis ARGS="--seconds 600 --seed N"` runs a long one; see tools/nemesis.py.
KV_NEMESIS_SECONDS and KV_NEMESIS_SEED change this run's length and schedule.
"""

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tools.nemesis import check, run, run_ha, summary

SECONDS = float(os.environ.get("KV_NEMESIS_SECONDS", "50"))
SEED = int(os.environ.get("KV_NEMESIS_SEED", "20261122"))


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 150)
def test_random_faults_under_load_break_no_invariant(tmp_path: Path):
    history, final = asyncio.run(run(SECONDS, SEED, tmp_path))
    anomalies, checked = check(history, final)
    print("\n" + summary(history, final, anomalies, checked, SEED, SECONDS))
    assert len(history.faults) >= SECONDS / 5, "the nemesis injected faults"
    assert checked > 100, "enough acknowledged writes to say something"
    assert anomalies == []


HA_SECONDS = float(os.environ.get("KV_NEMESIS_HA_SECONDS", "25"))


@pytest.mark.slow
@pytest.mark.timeout(HA_SECONDS + 150)
def test_random_faults_to_the_leader_and_etcd_break_no_invariant(tmp_path: Path):
    """`--ha`: the leader killed or paused past its lease, etcd killed or paused, followers
    too; the same checker over every acknowledged write."""
    if shutil.which("etcd") is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("CI must install etcd-server (see .ci/run)")
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    history, final = asyncio.run(run_ha(HA_SECONDS, SEED, tmp_path))
    anomalies, checked = check(history, final)
    print("\n" + summary(history, final, anomalies, checked, SEED, HA_SECONDS, ha=True))
    assert len(history.faults) >= HA_SECONDS / 6, "the nemesis injected faults"
    assert {f.kind.split()[0] for f in history.faults} & {"kill-leader", "pause-leader"}
    assert checked > 100, "enough acknowledged writes to say something"
    assert anomalies == []
