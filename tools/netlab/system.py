"""The host side of the partition lab: tools, names, addresses, and a crashed run's leftovers.

Names carry the owner's PID (`kvp<pid>-<n>-<host>` for namespaces, `kvp<pid>-<n>h` for the
one link in the root namespace), so :func:`sweep` can tell a crashed run's leftovers from
a live run's and removes only those whose owner is dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tools.cluster import stop_process

PREFIX = "kvp"
OWNED = re.compile(rf"^{PREFIX}(\d+)-(\d+)(?:-.+|h)$")
"""A name this harness made: the owner's PID, then the lab's number in that process."""
POOL = ipaddress.ip_network("10.231.0.0/16")
"""Where a lab's /24 is picked, one not on the host already."""
LOCK = Path("/run/lock/kv-netlab.lock")
"""Held while a lab picks its /24 and claims it, so two labs starting at once differ."""
APT = "apt-get install iproute2 nftables"
labs = itertools.count()
"""Numbers the labs of this process."""


class NetlabUnavailable(RuntimeError):
    """Namespaces cannot be made here: the message says why and what to install."""


def preflight() -> None:
    """Raise :class:`NetlabUnavailable` unless this process can make namespaces and rules."""
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        raise NetlabUnavailable(f"{' and '.join(missing)} not found: {APT}")
    if os.geteuid() != 0:
        raise NetlabUnavailable("network namespaces need root (CAP_NET_ADMIN); run as root")
    if not sys.platform.startswith("linux"):
        raise NetlabUnavailable("network namespaces are Linux's")


def run(*argv: str, input: str | None = None) -> str:
    """Run one ip/nft command; raise with its stderr when it fails."""
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def netns_names() -> list[str]:
    return [entry["name"] for entry in json.loads(run("ip", "-j", "netns", "list") or "[]")]


def root_links() -> list[str]:
    return [entry["ifname"] for entry in json.loads(run("ip", "-j", "link", "show") or "[]")]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Remove what a crashed run of this harness left: its namespaces (and the processes
    still in them) and its root link, only where the PID in the name is dead. The names
    removed."""
    removed = []
    for name in netns_names():
        owner = OWNED.match(name)
        if owner is None or pid_alive(int(owner.group(1))):
            continue
        for pid in run("ip", "netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        run("ip", "netns", "delete", name)
        removed.append(name)
    for name in root_links():
        owner = OWNED.match(name)
        if owner is not None and not pid_alive(int(owner.group(1))):
            with contextlib.suppress(RuntimeError):  # gone with its peer's namespace
                run("ip", "link", "delete", name)
            removed.append(name)
    return removed


@contextlib.contextmanager
def subnet_lock() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def pick_subnet() -> ipaddress.IPv4Network:
    """A /24 of :data:`POOL` that no address or route on the host overlaps."""
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for link in json.loads(run("ip", "-j", "addr", "show") or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet":
                taken.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", False))
    for route in json.loads(run("ip", "-j", "route", "show") or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            taken.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", False))
    for subnet in POOL.subnets(new_prefix=24):
        if not any(subnet.overlaps(other) for other in taken):
            return subnet  # type: ignore[return-value]
    raise RuntimeError(f"every /24 of {POOL} is in use on this host")


def stop_group(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """tools/cluster.py's stop_process, each signal sent to the process's whole group."""

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    stop_process(process, timeout, send)


def netns_pids(name: str) -> list[int]:
    try:
        return [int(pid) for pid in run("ip", "netns", "pids", name).split()]
    except RuntimeError:
        return []
