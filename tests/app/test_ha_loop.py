"""The HA loop against an in-memory etcd (kv/ha/coordinator.py), with a clock the test moves.

Each test builds a real HANode (its store, its role apps, in-process), runs its cycles by
hand, and cuts it off from "etcd" or from its peers. Peers are loopback ports nobody
listens on, so every peer request is refused at once: the node is cut off from them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kv.core.records import Entry
from kv.follower.node import Applied, Refused, TermUnknown
from kv.ha.coordinator import MemoryEtcd
from kv.ha.decide import Candidate, LeaderRecord, Role
from kv.ha.node import HANode
from kv.leader.service import LeaderNode
from kv.settings import HASettings
from tests.support import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cluster(nodes: int) -> str:
    # Port 1, 2...: nothing listens there, so each peer refuses at once.
    return ",".join(f"n{i}=http://127.0.0.1:{i}" for i in range(1, nodes + 1))


Make = Callable[..., HANode]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def check() -> bool:
        return condition()

    await eventually(check, timeout)


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    made: list[HANode] = []

    def build(nodes: int = 2, quorum: int = 1, data_dir: bool = True, **extra: object) -> HANode:
        settings = HASettings(
            node_name="n1",
            cluster=cluster(nodes),
            etcd_endpoints="http://127.0.0.1:9",
            write_quorum=quorum,
            campaign_delay_ms=0,
            data_dir=tmp_path / "n1" if data_dir else None,
            **extra,  # type: ignore[arg-type]
        )
        node = HANode(settings, coordinator=etcd.client("n1"), clock=clock)
        made.append(node)
        return node

    clock = Clock()
    etcd = MemoryEtcd(clock)
    build.etcd = etcd  # type: ignore[attr-defined]
    build.clock = clock  # type: ignore[attr-defined]
    yield build
    for node in made:
        await node.stop()


async def lead(node: HANode) -> LeaderNode:
    """Run cycles until the node has won the key and finished its start-up read."""
    sentence = await node.run_cycle()
    assert sentence.startswith("promoted self to leader"), sentence
    leader = node.leader_node
    assert leader is not None
    await until(lambda: leader.ready)
    return leader


async def test_a_node_cut_off_from_etcd_never_campaigns(make: Make) -> None:
    node = make()
    await node.open()
    node.etcd.reachable = False  # type: ignore[attr-defined]
    sentence = await node.run_cycle()
    assert "no election can take place" in sentence and node.role is Role.FOLLOWER


async def test_a_vacant_key_is_won_and_the_leader_takes_writes(make: Make) -> None:
    node = make()
    await node.open()
    await lead(node)
    assert node.is_leader and make.etcd.leader.name == "n1"  # type: ignore[attr-defined]
    assert await node.run_cycle() == "no action: I am n1, the leader with the lease"


async def test_a_leader_cut_off_from_etcd_steps_down_when_its_lease_runs_out(make: Make) -> None:
    node = make()
    await node.open()
    await lead(node)
    node.etcd.reachable = False  # type: ignore[attr-defined]
    make.clock.now += 1.0  # type: ignore[attr-defined]
    sentence = await node.run_cycle()
    assert "my lease has not run out" in sentence and node.is_leader
    make.clock.now += 0.6  # type: ignore[attr-defined]  # past TTL 2 s less the 500 ms margin
    assert not node.is_leader  # acknowledges nothing from this instant, before any cycle
    sentence = await node.run_cycle()
    assert sentence.startswith("stepped down") and node.role is Role.FOLLOWER


async def test_check_quorum_steps_a_leader_down_and_frees_the_lease(make: Make) -> None:
    node = make(check_quorum_ms=1000)
    await node.open()
    leader = await lead(node)
    assert await node.run_cycle() == "no action: I am n1, the leader with the lease"
    # Its one follower has not answered since it became ready, 1.2 s ago (real clock).
    assert leader.ready_at is not None
    leader.ready_at -= 1.2
    sentence = await node.run_cycle()
    assert sentence == (
        "stepped down: check-quorum: heard from only 0 of the 1 followers WRITE_QUORUM needs "
        "in the last 1000 ms"
    )
    assert node.role is Role.FOLLOWER and make.etcd.leader is None  # type: ignore[attr-defined]
    assert "check-quorum" in node.no_leader_reason()


async def test_a_leader_that_hears_its_quorum_never_steps_down(make: Make) -> None:
    node = make(check_quorum_ms=1000)
    await node.open()
    leader = await lead(node)
    assert leader.ready_at is not None
    leader.ready_at -= 60
    for link in leader.replicator.links:
        link.progress.last_heard = leader.ready_at + 59.9  # answered 100 ms ago
    assert await node.run_cycle() == "no action: I am n1, the leader with the lease"


async def test_check_quorum_zero_is_off(make: Make) -> None:
    node = make(check_quorum_ms=0)
    await node.open()
    leader = await lead(node)
    assert leader.ready_at is not None
    leader.ready_at -= 600
    assert await node.run_cycle() == "no action: I am n1, the leader with the lease"


async def test_pre_vote_a_node_that_cannot_reach_its_start_up_read_does_not_campaign(
    make: Make,
) -> None:
    node = make(nodes=3, quorum=1)  # two peers; a start-up read needs one of them
    await node.open()
    sentence = await node.run_cycle()
    assert sentence == "not campaigning: reached 0 of 2 peers, and a start-up read needs 1"
    assert make.etcd.leader is None and make.etcd.leases == {}  # type: ignore[attr-defined]


async def test_a_failed_start_up_read_releases_the_lease(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: LeaderNode) -> None:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(LeaderNode, "_start_up", broken)
    node = make()
    await node.open()
    assert (await node.run_cycle()).startswith("promoted self to leader")
    leader = node.leader_node
    assert leader is not None
    await until(lambda: leader.startup_error is not None)
    sentence = await node.run_cycle()
    assert sentence == (
        "stepped down: the start-up read failed (RuntimeError: the disk is on fire)"
    )
    assert node.role is Role.FOLLOWER and make.etcd.leader is None  # type: ignore[attr-defined]


async def test_a_stalled_start_up_read_releases_the_lease(make: Make) -> None:
    # Three nodes, W=1, no DATA_DIR: the promoted node must read one peer, and none answers.
    node = make(nodes=3, quorum=1, data_dir=False, startup_timeout_ms=1000)
    await node.open()
    me, _ = await node._ask_peers()

    async def n2_answered_then_froze() -> tuple[Candidate, dict[str, Candidate | None]]:
        return me, {"n2": Candidate("n2", 0, 0, 1), "n3": None}

    node._ask_peers = n2_answered_then_froze  # type: ignore[method-assign]
    assert (await node.run_cycle()).startswith("promoted self to leader")
    leader = node.leader_node
    assert leader is not None and not leader.ready
    assert await node.run_cycle() == "no action: I am n1, the leader with the lease"
    leader.started_at -= 1.5
    sentence = await node.run_cycle()
    assert sentence.startswith("stepped down: the start-up read made no progress for 1.")
    assert (
        "(STARTUP_TIMEOUT_MS): the leader is starting: it has read the entries of 0 of the 1"
        in (sentence)
    )
    assert make.etcd.leader is None  # type: ignore[attr-defined]


async def test_revocation_is_by_lease_never_by_name(make: Make) -> None:
    etcd: MemoryEtcd = make.etcd  # type: ignore[attr-defined]
    other, _ = await etcd.client("n1").grant(2)  # another process that calls itself n1
    etcd.leader, etcd.term = LeaderRecord("n1", "http://127.0.0.1:1", 3, other), 3
    node = make()
    await node.open()
    sentence = await node.run_cycle()
    assert "which this node never held" in sentence and other in etcd.leases
    make.clock.now += 2.0  # type: ignore[attr-defined]  # its lease expires in etcd
    assert (await node.run_cycle()).startswith("promoted self to leader")


async def test_a_lease_recorded_in_data_dir_is_revoked_by_the_next_process(make: Make) -> None:
    first = make()
    await first.open()
    await lead(first)
    lease = first.lease_id
    await first.stop()  # hands over: revokes; put the key back as a crash would leave it
    etcd: MemoryEtcd = make.etcd  # type: ignore[attr-defined]
    assert lease is not None
    etcd.leases[lease] = (make.clock.now + 2, 2)  # type: ignore[attr-defined]
    etcd.leader = LeaderRecord("n1", "http://127.0.0.1:1", etcd.term, lease)
    second = make()
    await second.open()
    assert (await second.run_cycle()) == f"revoked lease {lease:x}, which n1 held before"
    assert etcd.leader is None and lease not in etcd.leases


async def test_a_follower_without_data_dir_learns_the_term_from_etcd_first(make: Make) -> None:
    etcd: MemoryEtcd = make.etcd  # type: ignore[attr-defined]
    lease, _ = await etcd.client("n2").grant(2)
    etcd.leader, etcd.term = LeaderRecord("n2", "http://127.0.0.1:2", 7, lease), 7
    node = make(data_dir=False)
    await node.open()
    follower = node.follower_node
    assert follower is not None
    entry = [Entry("k", "v", 6 * 1_000_000_000 + 1)]
    assert isinstance(await follower.replicate(6, "old", entry), TermUnknown)
    assert "following n2" in await node.run_cycle()
    assert follower.term == 7
    refused = await follower.replicate(6, "old", entry)  # a leader of an older term
    assert isinstance(refused, Refused) and refused.follower_term == 7
    entry = [Entry("k", "v", 7 * 1_000_000_000 + 1)]
    assert isinstance(await follower.replicate(7, "new", entry), Applied)
