"""tools/cluster.py's process launcher: what every test cluster stands on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tools.cluster import free_ports, spawn, stop_process

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def assert_alive_for(child: subprocess.Popen[bytes], seconds: float) -> None:
    """The signal, had it been sent, arrives at once; watch the child for a while anyway."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert child.poll() is None, f"the child exited with {child.returncode}"
        time.sleep(0.05)


def test_a_child_started_on_a_short_lived_thread_outlives_that_thread() -> None:
    """Linux sends the death signal when the thread that forked a child ends. A node
    restarted through asyncio.to_thread used to die, silently, when the test that restarted
    it ended and its executor's threads were retired."""
    started: list[subprocess.Popen[bytes]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: started.append(spawn(SLEEPER, quiet=True))).result()
    # The pool's thread has ended here; the child must not have been signalled.
    (child,) = started
    try:
        assert_alive_for(child, 1.0)
    finally:
        stop_process(child, 5)


def test_a_child_started_on_a_plain_thread_outlives_it_too() -> None:
    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(spawn(SLEEPER, quiet=True)))
    thread.start()
    thread.join()
    (child,) = started
    try:
        assert_alive_for(child, 0.5)
    finally:
        stop_process(child, 5)


def test_one_clusters_ports_are_distinct() -> None:
    for _ in range(50):
        ports = free_ports(12)
        assert len(set(ports)) == 12, ports
