"""The nemesis, short: about a minute of random faults against real processes, then the checker.

`make nemesis ARGS="--seconds 600 --seed N"` runs a long one; see tools/nemesis.py.
KV_NEMESIS_SECONDS and KV_NEMESIS_SEED change this run's length and schedule.
"""

import asyncio
import os
from pathlib import Path

import pytest

from tools.nemesis import check, run, summary

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
