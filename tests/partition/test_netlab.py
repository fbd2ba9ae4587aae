"""The partition lab itself (tools/netlab): what a cut, a one-way cut and a slow link do to
packets, that clean-up leaves nothing, and that a sweep removes only a dead run's leftovers.

Each test makes a small network of bare namespaces; programs run in them are Python one-liners
started with `ip netns exec`, bounded by their own timeouts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.partition.conftest import assert_nothing_left, node_root, require_namespaces
from tools.netlab.cluster import NetCluster
from tools.netlab.net import Network
from tools.netlab.system import NetlabUnavailable, netns_names, preflight, run, sweep

pytestmark = pytest.mark.timeout(90)
PORT = 8000


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Network]:
    """Hosts a, b and c; b serves HTTP on PORT."""
    require_namespaces()
    network = Network(tmp_path)
    prefix = network.prefix
    try:
        network.open()
        for name in ("a", "b", "c"):
            network.add_host(name)
        server = [sys.executable, "-m", "http.server", "--bind", network.hosts["b"].address]
        network.spawn("b", [*server, str(PORT)], tmp_path / "server.log")
        wait_serving(network, "a", "b")
        yield network
    finally:
        network.close()
        assert_nothing_left(prefix)


def in_ns(net: Network, host: str, code: str, timeout: float = 10) -> str:
    """Run Python `code` inside `host`'s namespace; what it printed (or its error)."""
    done = subprocess.run(
        ["ip", "netns", "exec", net.hosts[host].netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.stdout.strip() if done.returncode == 0 else f"error: {done.stderr.strip()[-200:]}"


def fetch(net: Network, src: str, dst: str, timeout: float = 1.0) -> str:
    """From `src`, GET / on `dst`'s server: the seconds it took, or the error."""
    code = f"""
import socket, time
start = time.monotonic()
try:
    with socket.create_connection(("{net.hosts[dst].address}", {PORT}), timeout={timeout}) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        s.recv(12)
    print(f"{{time.monotonic() - start:.3f}}")
except OSError as exc:
    print(type(exc).__name__)
"""
    return in_ns(net, src, code)


def wait_serving(net: Network, src: str, dst: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not fetch(net, src, dst)[0].isdigit():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dst} is not serving")
        time.sleep(0.1)


def udp_heard(net: Network, src: str, dst: str) -> bool:
    """Does a datagram from `src` reach `dst`? (No connection, so one way at a time.)"""
    listen = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{net.hosts[dst].address}", 9999)); s.settimeout(1.5)
print("ready", flush=True)
try:
    print(s.recv(10).decode())
except TimeoutError:
    print("nothing")
"""
    send = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"hello", ("{net.hosts[dst].address}", 9999)); time.sleep(0.05)
"""
    argv = ["ip", "netns", "exec", net.hosts[dst].netns, sys.executable, "-c", listen]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as listener:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        in_ns(net, src, send)
        heard = listener.stdout.read().strip()
    return heard == "hello"


def test_each_host_has_its_own_namespace_address_and_loopback(net: Network) -> None:
    names = netns_names()
    for host in net.hosts.values():
        assert host.netns in names and host.netns.startswith(net.prefix)
        loopback = "import socket; s = socket.create_server(('127.0.0.1', 0)); "
        loopback += "socket.create_connection(s.getsockname(), timeout=1); print('up')"
        assert in_ns(net, host.name, loopback) == "up"
    assert net.subnet is not None and net.host_address == str(net.subnet[1])
    addresses = {host.address for host in net.hosts.values()}
    assert len(addresses) == 3 and all(a.startswith("10.231.") for a in addresses)
    # The test process, in the root namespace, reaches them.
    assert httpx.get(f"http://{net.hosts['b'].address}:{PORT}/", timeout=2).status_code == 200


def test_a_cut_drops_both_ways_and_heal_restores(net: Network) -> None:
    net.cut("a", "b")
    assert fetch(net, "a", "b") == "TimeoutError"
    assert not udp_heard(net, "a", "b") and not udp_heard(net, "b", "a")
    assert fetch(net, "c", "b")[0].isdigit(), "c is not cut"
    net.heal()
    assert net.faults_left() == []
    assert fetch(net, "a", "b")[0].isdigit()


def test_a_one_way_cut_drops_only_that_way(net: Network) -> None:
    net.cut_one_way("a", "b")
    assert not udp_heard(net, "a", "b")
    assert udp_heard(net, "b", "a"), "packets from b still reach a"
    assert fetch(net, "a", "b") == "TimeoutError"  # TCP needs both ways
    net.heal()
    assert fetch(net, "a", "b")[0].isdigit()


def test_isolate_keeps_the_hosts_named_and_the_test_process(net: Network) -> None:
    net.isolate("b", keep=["c"])
    assert fetch(net, "a", "b") == "TimeoutError"
    assert fetch(net, "c", "b")[0].isdigit()
    assert httpx.get(f"http://{net.hosts['b'].address}:{PORT}/", timeout=2).status_code == 200
    net.heal()


def test_a_slow_link_delays_each_way_and_resets_connections_opened_before(net: Network) -> None:
    before = float(fetch(net, "a", "b"))
    # A connection a opened before the link turned slow: reset, so it reconnects through
    # the proxy instead of keeping the fast path.
    held = f"""
import socket, time
s = socket.create_connection(("{net.hosts["b"].address}", {PORT}), timeout=2)
print("open", flush=True)
input()
try:
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: b\\r\\n\\r\\n")
    print(s.recv(12) or b"closed")
except OSError as exc:
    print(type(exc).__name__)
"""
    argv = ["ip", "netns", "exec", net.hosts["a"].netns, sys.executable, "-c", held]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as old:
        assert old.stdin is not None and old.stdout is not None
        assert old.stdout.readline().strip() == "open"
        net.slow("a", [("b", PORT)], 150)
        old.stdin.write("\n")
        old.stdin.flush()
        assert old.stdout.readline().strip() == "ConnectionResetError"
    slow = float(fetch(net, "a", "b", timeout=3))
    # The request waits 150 ms on its way, the answer 150 ms on its way back.
    assert 0.29 <= slow < 1.0 and before < 0.1, (before, slow)
    assert float(fetch(net, "c", "b")) < 0.1, "only a's link is slow"
    assert any("dnat" in line for line in net.rules("a").splitlines())
    net.heal()
    assert net.faults_left() == []
    assert float(fetch(net, "a", "b")) < 0.1


def test_close_removes_every_namespace_link_and_process(tmp_path: Path) -> None:
    require_namespaces()
    network = Network(tmp_path).open()
    network.add_host("x")
    process = network.spawn("x", [sys.executable, "-c", "import time; time.sleep(60)"])
    names = [network.bridge_ns, network.hosts["x"].netns, network.host_link]
    assert set(names) <= set(network.leftovers())
    network.close()
    assert process.poll() is not None
    assert network.leftovers() == []
    assert_nothing_left(network.prefix)


def test_sweep_removes_a_dead_runs_leftovers_only(tmp_path: Path) -> None:
    require_namespaces()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"kvp{dead.pid}-0-x", f"kvp{os.getpid()}-999-x"
    run("ip", "netns", "add", stale)
    run("ip", "netns", "add", live)
    leftover = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while not run("ip", "netns", "pids", stale).split():
            assert time.monotonic() < deadline, "the sleeper did not start"
            time.sleep(0.05)
        removed = sweep()
        assert stale in removed and live not in removed
        assert leftover.wait(5) != 0, "the process left in the stale namespace was killed"
        names = netns_names()
        assert stale not in names and live in names
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        for name in (stale, live):
            if name in netns_names():
                run("ip", "netns", "delete", name)
    assert stale not in netns_names() and live not in netns_names()


def test_without_root_the_lab_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetlabUnavailable, match="root"):
        preflight()
    monkeypatch.setattr("shutil.which", lambda tool: None)
    with pytest.raises(NetlabUnavailable, match="apt-get install iproute2 nftables"):
        preflight()


def test_a_one_member_etcd_cluster_elects_and_cleans_up(tmp_path: Path) -> None:
    require_namespaces()
    cluster = NetCluster(tmp_path, nodes=2, etcd_members=1, quorum=1, root=node_root())
    prefix = cluster.network.prefix
    with cluster:
        assert len(cluster.etcd) == 1
        leader = cluster.wait_for_primary(10)
        assert leader in cluster.names
        assert cluster.etcd_in_use(leader) == ["etcd1"]
    assert_nothing_left(prefix)
