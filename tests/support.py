"""Helpers every kind of test shares: one way to wait for a condition, one way to read memory."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

Check = Callable[[], Awaitable[bool]]


async def eventually(check: Check, timeout: float = 5.0, what: str = "condition") -> float:
    """Poll `check` until it holds; return the seconds it took, or fail after `timeout`."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def replicas_equal(client: httpx.AsyncClient, urls: list[str]) -> bool:
    """Whether every node's /state (store and versions) equals the first's (the leader's)."""
    states = [(await client.get(f"{url}/state")).json() for url in urls]
    want = (states[0]["store"], states[0]["versions"])
    return all((s["store"], s["versions"]) == want for s in states[1:])


def rss_bytes(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def require_etcd() -> None:
    """Skip a test that needs Debian's etcd where it is missing, but fail under CI, which
    installs it (.ci/run): a skip there would hide a broken install."""
    if shutil.which("etcd") is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("CI must install etcd-server (see .ci/run)")
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
