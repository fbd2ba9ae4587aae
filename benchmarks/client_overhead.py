"""What kv/client.py costs per call, against a bare httpx call, side by side.

    python benchmarks/client_overhead.py                 # 6 rounds x 500 calls of each kind
    python benchmarks/client_overhead.py --rounds 10 --calls 1000

One cluster (one follower, zero delay) on loopback. Each round makes the same sequential
calls twice, alternating which goes first: once through a bare `httpx.AsyncClient` (build
the URL, send, `response.json()`), once through `AsyncKVClient` (endpoint choice, an
Idempotency-Key per write, status handling, and a pydantic model for the result). Reads
are `GET /keys/{key}`; writes are `PUT /keys/{key}?w=0`, so no follower is waited for.
For each it prints the median wall time per call and the CPU this process spent per call
(the client's own work: the server's is the same for both), and the client's extra as a
difference and a ratio. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kv.client import AsyncKVClient
from tools.cluster import LocalCluster

Call = Callable[[int], Awaitable[object]]


async def timed(call: Call, calls: int) -> tuple[float, float]:
    """Wall and CPU seconds per call, over `calls` sequential calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(calls):
        await call(i)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


async def run(url: str, rounds: int, calls: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    async with (
        httpx.AsyncClient(base_url=url, trust_env=False) as bare,
        AsyncKVClient([url]) as client,
    ):
        await client.put("bench", "x" * 20, w=0)

        async def bare_get(_: int) -> object:
            response = await bare.get("/keys/bench")
            response.raise_for_status()
            return response.json()

        async def bare_put(i: int) -> object:
            response = await bare.put("/keys/bench", params={"w": 0}, json={"value": "x" * 20})
            response.raise_for_status()
            return response.json()

        async def client_get(_: int) -> object:
            return await client.get("bench")

        async def client_put(i: int) -> object:
            return await client.put("bench", "x" * 20, w=0)

        kinds: dict[str, tuple[Call, Call]] = {
            "read": (bare_get, client_get),
            "write": (bare_put, client_put),
        }
        for warm in (bare_get, client_get, bare_put, client_put):
            await timed(warm, 50)
        for round_ in range(rounds):
            for kind, (bare_call, client_call) in kinds.items():
                order = [("bare", bare_call), ("client", client_call)]
                for name, call in order if round_ % 2 == 0 else reversed(order):
                    wall, cpu = await timed(call, calls)
                    series = results.setdefault(f"{kind}/{name}", {"wall": [], "cpu": []})
                    series["wall"].append(wall)
                    series["cpu"].append(cpu)
    return results


def report(results: dict[str, dict[str, list[float]]]) -> None:
    print(f"{'':14}{'wall µs/call':>14}{'client CPU µs/call':>20}")
    for kind in ("read", "write"):
        medians = {}
        for name in ("bare", "client"):
            series = results[f"{kind}/{name}"]
            medians[name] = (statistics.median(series["wall"]), statistics.median(series["cpu"]))
            wall, cpu = medians[name]
            print(f"{kind + ' ' + name:14}{wall * 1e6:14.0f}{cpu * 1e6:20.0f}")
        (bare_wall, bare_cpu), (client_wall, client_cpu) = medians["bare"], medians["client"]
        print(
            f"{kind + ' extra':14}{(client_wall - bare_wall) * 1e6:+14.0f}"
            f"{(client_cpu - bare_cpu) * 1e6:+20.0f}   "
            f"(x{client_wall / bare_wall:.2f} wall, x{client_cpu / bare_cpu:.2f} CPU)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=500, help="sequential calls per round")
    args = parser.parse_args()
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be at least 1")
    with (
        tempfile.TemporaryDirectory(prefix="client-overhead-") as logs,
        LocalCluster(
            followers=1, quorum=0, max_delay_ms=0, base_port=0, log_dir=Path(logs)
        ) as cluster,
    ):
        print(f"{args.rounds} rounds x {args.calls} sequential calls of each kind, "
              f"against {cluster.leader_url}")  # fmt: skip
        report(asyncio.run(run(cluster.leader_url, args.rounds, args.calls)))


if __name__ == "__main__":
    main()
