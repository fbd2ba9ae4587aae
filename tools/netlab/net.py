"""Network namespaces on one bridge, with links cut by nftables and slowed by a proxy.

Every host of a lab (an HA node, an etcd member, the delay proxy) is a network namespace
of its own with one address on a private bridge. The bridge sits in a namespace of its
own too; one veth joins it to the root namespace, whose end gets the lab's first address,
so the test process reaches every host over plain HTTP and is never cut off itself: it
plays the clients, which see both sides of a partition.

Names carry the owner's PID (tools/netlab/system.py), so a crashed run's leftovers are
swept when the next lab opens. Faults are nftables rules in the faulted host's own
namespace (`table inet kvcut`, `table ip kvslow`): deleting the namespace deletes them,
and nothing is ever written to the root namespace's ruleset.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.cluster import ROOT, spawn
from tools.netlab.system import (
    PREFIX,
    labs,
    netns_names,
    netns_pids,
    pick_subnet,
    preflight,
    root_links,
    run,
    stop_group,
    subnet_lock,
    sweep,
)

__all__ = ["Host", "Network", "SlowLink"]


@dataclass(frozen=True)
class Host:
    """One namespace on the lab's bridge."""

    name: str
    netns: str
    address: str


@dataclass(frozen=True)
class SlowLink:
    src: str
    targets: tuple[tuple[str, int], ...]
    delay_ms: float
    routes: tuple[tuple[int, str, int], ...]
    """(proxy port, target address, target port) for each target."""


class Network:
    """A lab's namespaces, bridge and faults; a context manager that removes all of it.

    Faults are kept as data (which host's packets to which host are dropped, which links
    go through the proxy) and each change rewrites the rules of the hosts it touches in
    one nft transaction.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.prefix = f"{PREFIX}{os.getpid()}-{next(labs)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.host_link = f"{self.prefix}h"
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_address = ""
        self.drops: set[tuple[str, str]] = set()
        """(src, dst): packets from src to dst are dropped."""
        self.slow_links: list[SlowLink] = []
        self._proxies: list[subprocess.Popen[bytes]] = []
        self._processes: list[subprocess.Popen[bytes]] = []
        self._applied: dict[str, str] = {}
        self._namespaces: list[str] = []
        self._next_proxy_port = 20_000

    # -- set-up and clean-up -------------------------------------------------------------

    def open(self) -> Network:
        preflight()
        sweep()
        try:
            self._add_namespace(self.bridge_ns)
            run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            with subnet_lock():
                self.subnet = pick_subnet()
                self.host_address = str(self.subnet[1])
                run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name",
                    "up0", "netns", self.bridge_ns)  # fmt: skip
                ipv6 = Path(f"/proc/sys/net/ipv6/conf/{self.host_link}/disable_ipv6")
                if ipv6.exists():
                    ipv6.write_text("1")
                run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.host_link)
            run("ip", "link", "set", self.host_link, "up")
            run("ip", "-n", self.bridge_ns, "link", "set", "up0", "master", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Network:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A namespace with one address on the bridge, loopback up, empty fault tables."""
        assert self.subnet is not None, "open() the network first"
        index = len(self.hosts)
        host = Host(name, f"{self.prefix}-{name}", str(self.subnet[10 + index]))
        self._add_namespace(host.netns)
        port = f"v{index}"
        run("ip", "-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name",
            "eth0", "netns", host.netns)  # fmt: skip
        run("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        self._nft(host, BASE_RULES)
        self.hosts[name] = host
        return host

    def spawn(
        self,
        host: str,
        argv: Sequence[str],
        log_path: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host`'s namespace. `ip netns exec` execs it, so the PID is
        the program's, and spawn() makes it the leader of a process group of its own."""
        command = ["ip", "netns", "exec", self.hosts[host].netns, *argv]
        process = spawn(command, log_path, cwd=cwd, env=env, quiet=log_path is None)
        self._processes.append(process)
        return process

    def close(self) -> None:
        """Stop every process started here (by process group), then delete every
        namespace and the root link by name. Raises if anything of this lab is left."""
        for process in self._processes:
            stop_group(process)
        self._processes.clear()
        self._proxies.clear()
        for name in reversed(self._namespaces):
            for pid in netns_pids(name):  # a child of a process stopped above, say
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(RuntimeError):
                run("ip", "netns", "delete", name)
        self._namespaces.clear()
        if self.host_link in root_links():
            with contextlib.suppress(RuntimeError):
                run("ip", "link", "delete", self.host_link)
        left = self.leftovers()
        if left:
            raise RuntimeError(f"the lab left {', '.join(left)} behind")

    def leftovers(self) -> list[str]:
        """Namespaces and root links of this lab still present (empty once closed)."""
        mine = [*netns_names(), *root_links()]
        return [n for n in mine if n.startswith(f"{self.prefix}-") or n == self.host_link]

    # -- faults ----------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """No packet between `a` and `b`, either way."""
        self.drops |= {(a, b), (b, a)}
        self._apply({a, b})

    def cut_one_way(self, src: str, dst: str) -> None:
        """Packets from `src` to `dst` are dropped (on src's way out and dst's way in);
        packets from dst still reach src. For TCP that breaks connections both ways
        (a SYN-ACK from src is a packet to dst), but the two ends see different things."""
        self.drops.add((src, dst))
        self._apply({src, dst})

    def isolate(self, name: str, keep: Iterable[str] = ()) -> None:
        """Cut `name` from every other host but those in `keep` (the host never is)."""
        kept = {name, *keep}
        others = [other for other in self.hosts if other not in kept]
        for other in others:
            self.drops |= {(name, other), (other, name)}
        self._apply({name, *others})

    def slow(self, src: str, targets: Sequence[tuple[str, int]], delay_ms: float) -> None:
        """Delay every byte of `src`'s TCP connections to each (host, port) of `targets` by
        `delay_ms` each way: nftables DNAT in src's namespace sends new connections to a
        delay proxy in the `proxy` host, and src's connections already open are reset so
        that they reconnect through it."""
        proxy = self.hosts.get("proxy") or self.add_host("proxy")
        routes = []
        for target, port in targets:
            routes.append((self._next_proxy_port, self.hosts[target].address, port))
            self._next_proxy_port += 1
        argv = [sys.executable, "-m", "tools.netlab.delay", "--delay-ms", f"{delay_ms:g}",
                *(f"--route={proxy.address}:{p}={a}:{tp}" for p, a, tp in routes)]  # fmt: skip
        log_path = self.workdir / f"proxy-{len(self.slow_links)}.log"
        process = self.spawn("proxy", argv, log_path)
        self._proxies.append(process)
        _wait_listening(proxy.address, [p for p, _, _ in routes], process)
        self.slow_links.append(SlowLink(src, tuple(targets), delay_ms, tuple(routes)))
        self._apply({src})

    def heal(self) -> None:
        """Every link whole and fast again: no drops, no proxies."""
        touched = {n for pair in self.drops for n in pair} | {s.src for s in self.slow_links}
        self.drops.clear()
        self.slow_links.clear()
        self._apply(touched)
        for process in self._proxies:
            stop_group(process)
            self._processes.remove(process)
        self._proxies.clear()

    def connections(self, name: str) -> list[tuple[str, int]]:
        """(host, port) of every established TCP connection `name` has to a lab host: its
        own connections to servers, and (with an ephemeral port) its clients'."""
        out = run("ip", "netns", "exec", self.hosts[name].netns, "ss", "-Htn", "state",
                  "established")  # fmt: skip
        by_address = {host.address: host.name for host in self.hosts.values()}
        found = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                address, _, port = fields[3].rpartition(":")
                if address in by_address:
                    found.append((by_address[address], int(port)))
        return found

    def faults_left(self) -> list[str]:
        """Fault rules still in any host's namespace, and proxies still running: empty
        after :meth:`heal`."""
        left = [f"proxy pid {p.pid}" for p in self._proxies if p.poll() is None]
        for name in self.hosts:
            for line in self.rules(name).splitlines():
                if any(word in line for word in (" drop", "dnat", "reject")):
                    left.append(f"{name}: {line.strip()}")
        return left

    def rules(self, name: str) -> str:
        """The fault rules now in `name`'s namespace, as nft lists them."""
        netns = self.hosts[name].netns
        return run("ip", "netns", "exec", netns, "nft", "list", "ruleset")

    def _apply(self, names: Iterable[str]) -> None:
        for name in sorted(names):
            script = self._script(name)
            if self._applied.get(name, "") != script:
                self._nft(self.hosts[name], FLUSH + script)
                self._applied[name] = script

    def _script(self, name: str) -> str:
        address = self.hosts[name].address
        lines = []
        out = sorted(self.hosts[d].address for s, d in self.drops if s == name)
        into = sorted(self.hosts[s].address for s, d in self.drops if d == name)
        if out:
            lines.append(f"add rule inet kvcut output ip daddr {{ {', '.join(out)} }} drop")
        if into:
            lines.append(f"add rule inet kvcut input ip saddr {{ {', '.join(into)} }} drop")
        proxy = self.hosts.get("proxy")
        for link in (s for s in self.slow_links if s.src == name):
            assert proxy is not None
            for port, target, target_port in link.routes:
                lines.append(f"add rule ip kvslow output ip daddr {target} tcp dport "
                             f"{target_port} dnat to {proxy.address}:{port}")  # fmt: skip
                # The filter hook sees addresses after DNAT: only connections opened before
                # the redirect still go to the target itself. Reset them.
                lines.append(f"add rule inet kvcut output ip saddr {address} ip daddr {target}"
                             f" tcp dport {target_port} reject with tcp reset")  # fmt: skip
        return "".join(line + "\n" for line in lines)

    def _nft(self, host: Host, script: str) -> None:
        run("ip", "netns", "exec", host.netns, "nft", "-f", "-", input=script)


BASE_RULES = """\
add table inet kvcut
add chain inet kvcut input { type filter hook input priority 0; policy accept; }
add chain inet kvcut output { type filter hook output priority 0; policy accept; }
add table ip kvslow
add chain ip kvslow output { type nat hook output priority -100; policy accept; }
"""
FLUSH = """\
flush chain inet kvcut input
flush chain inet kvcut output
flush chain ip kvslow output
"""


def _wait_listening(
    address: str, ports: list[int], process: subprocess.Popen[bytes], timeout: float = 10
) -> None:
    """Poll until the proxy accepts on every port (it was started a moment ago)."""
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        if process.poll() is not None:
            raise RuntimeError(f"the delay proxy exited with code {process.returncode}")
        try:
            with socket.create_connection((address, waiting[0]), timeout=0.5):
                waiting.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the delay proxy is not listening on {address}:{waiting[0]}")
        time.sleep(0.05)
