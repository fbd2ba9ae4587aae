"""tools/cluster.py's process launcher: what every test cluster stands on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from tools.cluster import free_ports, spawn, stop_process

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def on_a_pool_thread(work: Callable[[], None]) -> None:
    """As asyncio.to_thread does: on an executor's thread, retired when the pool shuts down."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(work).result()


def on_a_plain_thread(work: Callable[[], None]) -> None:
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


@pytest.mark.parametrize("run_on", [on_a_pool_thread, on_a_plain_thread])
def test_a_child_started_on_a_short_lived_thread_outlives_that_thread(
    run_on: Callable[[Callable[[], None]], None],
) -> None:
    """Linux sends the death signal when the thread that forked a child ends. A node
    restarted through asyncio.to_thread used to die, silently, when the test that restarted
    it ended and its executor's threads were retired."""
    started: list[subprocess.Popen[bytes]] = []
    run_on(lambda: started.append(spawn(SLEEPER, quiet=True)))
    # The thread has ended here; the signal, had it been sent, arrives at once.
    (child,) = started
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert child.poll() is None, f"the child exited with {child.returncode}"
            time.sleep(0.05)
    finally:
        stop_process(child, 5)


def test_one_clusters_ports_are_distinct() -> None:
    for _ in range(50):
        ports = free_ports(12)
        assert len(set(ports)) == 12, ports
