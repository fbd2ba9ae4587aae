"""An HA cluster whose every node and etcd member has a namespace and an address of its own.

:class:`NetCluster` satisfies tools/cluster.py's :class:`HAControl` (faults by node name,
who is primary), so the failover checks apply unchanged, and adds the network's faults:
cuts, one-way cuts, isolation and slow links between any two of its hosts, and etcd
members killed and started one at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tools.cluster import (
    ETCD_MISSING,
    ROOT,
    HANodeProcess,
    primaries,
    stop_process,
    wait_for_primary,
    wait_healthy,
)
from tools.netlab.net import Network

NODE_PORT = 8000
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380


@dataclass
class NetNode(HANodeProcess):
    """An HA node started inside its host's namespace, reached at the host's address."""

    network: Network | None = None
    host: str = ""

    @property
    def url(self) -> str:
        assert self.network is not None
        return f"http://{self.network.hosts[self.host].address}:{self.port}"

    def start(self) -> None:
        assert self.network is not None
        self.process = self.network.spawn(
            self.host, [sys.executable, "-m", "kv.ha"], self.log_path, env=self.env, cwd=self.cwd
        )


@dataclass
class EtcdMember:
    """One member of the lab's etcd, in its own namespace, its data kept across restarts."""

    name: str
    network: Network
    data_dir: Path
    initial_cluster: str
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.network.hosts[self.name].address

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{ETCD_CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{ETCD_PEER_PORT}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError(ETCD_MISSING)
        command = [
            binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.network.prefix, "--log-level", "warn",
        ]  # fmt: skip
        self.process = self.network.spawn(self.name, command, self.log_path)

    def _group(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        if self.process is not None:
            self._group(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10, self._group)
        self.process = None


@dataclass
class NetCluster:
    """`nodes` HA nodes and an etcd of `etcd_members` (1 or 3), each in a namespace."""

    workdir: Path
    nodes: int = 4
    etcd_members: int = 3
    quorum: int | None = 2
    min_delay_ms: float = 0
    max_delay_ms: float = 20
    extra_env: Mapping[str, str] = field(default_factory=dict)
    root: Path = ROOT
    """The checkout whose `kv.ha` the nodes run (a benchmark may compare two)."""
    local = True
    network: Network = field(init=False)
    members: list[NetNode] = field(default_factory=list, init=False)
    etcd: list[EtcdMember] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.network = Network(self.workdir)

    # -- life ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> NetCluster:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            self.network.open()
            etcd_names = [f"etcd{i + 1}" for i in range(self.etcd_members)]
            names = [f"node{i + 1}" for i in range(self.nodes)]
            for name in [*etcd_names, *names]:
                self.network.add_host(name)
            initial = ",".join(
                f"{n}=http://{self.network.hosts[n].address}:{ETCD_PEER_PORT}" for n in etcd_names
            )
            self.etcd = [
                EtcdMember(n, self.network, self.workdir / "etcd" / n, initial, logs / f"{n}.log")
                for n in etcd_names
            ]
            for member in self.etcd:
                member.start()
            wait_healthy(self.etcd_urls, timeout, [m.process for m in self.etcd if m.process])
            self.members = [self._node(name, names, logs) for name in names]
            for node in self.members:
                node.start()
            wait_for_primary(self, timeout, watched=self.members)
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, name: str, names: list[str], logs: Path) -> NetNode:
        hosts = self.network.hosts
        env = {
            "LOG_LEVEL": "INFO",
            **self.extra_env,
            "NODE_NAME": name,
            "CLUSTER": ",".join(f"{n}=http://{hosts[n].address}:{NODE_PORT}" for n in names),
            "ETCD_ENDPOINTS": ",".join(self.etcd_urls),
            "MIN_DELAY_MS": f"{self.min_delay_ms:g}",
            "MAX_DELAY_MS": f"{self.max_delay_ms:g}",
            "DATA_DIR": str(self.workdir / "data" / name),
        }
        if self.quorum is not None:
            env["WRITE_QUORUM"] = str(self.quorum)
        return NetNode(
            name, NODE_PORT, env, logs / f"{name}.log", self.root, network=self.network, host=name
        )

    def stop(self) -> None:
        """Stop every node and member, then remove the network (raises if any is left)."""
        for node in self.members:
            node.stop()
        for member in self.etcd:
            member.stop()
        self.network.close()

    def __enter__(self) -> NetCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- who is where ---------------------------------------------------------------------

    @property
    def etcd_urls(self) -> list[str]:
        return [member.client_url for member in self.etcd]

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.members]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.members]

    def member(self, name: str) -> NetNode:
        return next(node for node in self.members if node.name == name)

    def node_urls(self) -> dict[str, str]:
        return {node.name: node.url for node in self.members if node.running}

    def url_of(self, name: str) -> str:
        return self.member(name).url

    def name_of(self, url: str) -> str:
        return next(node.name for node in self.members if node.url == url)

    def primaries(self, client: httpx.Client | None = None) -> list[str]:
        return primaries(self, client)

    def wait_for_primary(self, timeout: float = 30.0, exclude: Sequence[str] = ()) -> str:
        return wait_for_primary(self, timeout, exclude)

    def etcd_member(self, name_or_index: str | int) -> EtcdMember:
        if isinstance(name_or_index, int):
            return self.etcd[name_or_index]
        return next(member for member in self.etcd if member.name == name_or_index)

    # -- process faults ----------------------------------------------------------------------

    def kill(self, name: str) -> None:
        self.member(name).kill()

    def terminate(self, name: str) -> None:
        self.member(name).signal_group(signal.SIGTERM)

    def wait_stopped(self, name: str, timeout: float = 15.0) -> None:
        node = self.member(name)
        if node.process is not None:
            node.process.wait(timeout)
            node.process = None

    def pause(self, name: str) -> None:
        self.member(name).signal_group(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.member(name).signal_group(signal.SIGCONT)

    def restart(self, name: str, timeout: float = 30.0) -> None:
        node = self.member(name)
        node.stop()
        node.start()
        wait_healthy([node.url], timeout, [node.process] if node.process else [])

    def kill_etcd(self) -> None:
        for member in self.etcd:
            member.kill()

    def start_etcd(self) -> None:
        for member in self.etcd:
            if not member.running:
                member.start()
        wait_healthy(self.etcd_urls, 30, [m.process for m in self.etcd if m.process])

    def etcd_raft_leader(self) -> str | None:
        """The member etcd's own Raft elected, as the running members report it."""
        ids: dict[str, str] = {}
        leader_id = None
        with httpx.Client(timeout=1.0, trust_env=False) as client:
            for member in self.etcd:
                if not member.running:
                    continue
                try:
                    status = client.post(f"{member.client_url}/v3/maintenance/status", json={})
                    body = status.json()
                except (httpx.HTTPError, ValueError):
                    continue
                ids[str(body["header"]["member_id"])] = member.name
                leader_id = str(body.get("leader", leader_id))
        return ids.get(leader_id or "")

    def kill_etcd_member(self, name_or_index: str | int) -> None:
        self.etcd_member(name_or_index).kill()

    def start_etcd_member(self, name_or_index: str | int, timeout: float = 30.0) -> None:
        member = self.etcd_member(name_or_index)
        if not member.running:
            member.start()
        wait_healthy([member.client_url], timeout, [member.process] if member.process else [])

    # -- network faults, by host name (node1.., etcd1..) ---------------------------------------

    def cut(self, a: str, b: str) -> None:
        self.network.cut(a, b)

    def cut_one_way(self, src: str, dst: str) -> None:
        self.network.cut_one_way(src, dst)

    def isolate(self, name: str, keep: Iterable[str] = ()) -> None:
        self.network.isolate(name, keep)

    def slow(self, src: str, targets: Sequence[tuple[str, int]], delay_ms: float) -> None:
        self.network.slow(src, targets, delay_ms)

    def etcd_in_use(self, name: str) -> list[str]:
        """The etcd members node `name` has connections to now, most used first."""
        members = {member.name for member in self.etcd}
        peers = [h for h, port in self.network.connections(name) if port == ETCD_CLIENT_PORT]
        counts = Counter(peer for peer in peers if peer in members)
        return [peer for peer, _ in counts.most_common()]

    def heal(self, timeout: float = 30.0) -> str:
        """Every link whole, every etcd member and node running; the one primary's name."""
        self.network.heal()
        for member in self.etcd:
            if not member.running:
                member.start()
        wait_healthy(self.etcd_urls, timeout, [m.process for m in self.etcd if m.process])
        for node in self.members:
            if node.running:
                node.signal_group(signal.SIGCONT)
            else:
                self.restart(node.name, timeout)
        deadline = time.monotonic() + timeout
        return self.wait_for_primary(max(1.0, deadline - time.monotonic()))
