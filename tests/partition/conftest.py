"""The partition lab's fixtures: one cluster of namespaces per module, and the checks that
it leaves nothing behind.

These tests need root, `ip` and `nft` (Debian: iproute2, nftables). Where namespaces
cannot be made they fail saying why; they never skip. `KV_PARTITION_ROOT` names another
checkout whose `kv.ha` the nodes run (default: this one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.cluster import ROOT
from tools.netlab.cluster import NetCluster
from tools.netlab.system import NetlabUnavailable, netns_names, preflight, root_links


def require_namespaces() -> None:
    try:
        preflight()
    except NetlabUnavailable as exc:
        pytest.fail(f"the partition tests need network namespaces: {exc}", pytrace=False)


def assert_nothing_left(prefix: str) -> None:
    """No namespace and no root link whose name the lab with `prefix` made."""
    left = [n for n in [*netns_names(), *root_links()] if n.startswith(prefix)]
    assert not left, f"left behind: {left}"


def node_root() -> Path:
    """The checkout whose `kv.ha` the nodes run: KV_PARTITION_ROOT, else this one."""
    return Path(os.environ.get("KV_PARTITION_ROOT") or ROOT)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    """Five HA nodes (W=2, delays 0-20 ms, DATA_DIR each) and a three-member etcd: with one
    follower cut off and the leader dead, the three left still make W=2."""
    require_namespaces()
    cluster = NetCluster(tmp_path_factory.mktemp("lab"), nodes=5, etcd_members=3, root=node_root())
    prefix = cluster.network.prefix
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        assert_nothing_left(prefix)


@pytest.fixture
def healed(lab: NetCluster) -> Iterator[NetCluster]:
    """The module's cluster; after the test, no fault rule and no proxy may be left."""
    yield lab
    left = lab.network.faults_left()
    if left:
        lab.heal()  # for the next test, whatever this one did
    assert left == [], "a scenario left faults in place"
