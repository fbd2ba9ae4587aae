"""A TCP proxy that delays every chunk by a fixed time each way: a slow link.

    python -m tools.netlab.delay --delay-ms 150 --route 10.231.4.30:20000=10.231.4.12:8000

This kernel has no `tc netem`, so a slow link is this proxy, run in a namespace of its own
(tools/netlab/net.py's `proxy` host) with nftables DNAT in the source's namespace sending
that source's connections here. Each chunk read is written on `delay` later, in order, so
the link adds latency without limiting throughput; a half-close is passed on the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

CHUNK = 65_536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader to writer, each chunk `delay_s` after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while chunk := await reader.read(CHUNK):
                queue.put_nowait((loop.time() + delay_s, chunk))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + delay_s, b""))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


async def _serve_one(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay_s: float,
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _pipe(client_reader, upstream_writer, delay_s),
            _pipe(upstream_reader, client_writer, delay_s),
        )
    except (ConnectionError, OSError):
        pass
    finally:
        for writer in (client_writer, upstream_writer):
            writer.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(routes: list[tuple[tuple[str, int], tuple[str, int]]], delay_s: float) -> None:
    servers = []
    for listen, target in routes:

        async def handle(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, target: tuple[str, int] = target
        ) -> None:
            await _serve_one(r, w, target, delay_s)

        servers.append(await asyncio.start_server(handle, *listen, reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="added each way")
    parser.add_argument(
        "--route", action="append", required=True, metavar="LISTEN=TARGET",
        help="host:port to listen on = host:port to forward to; repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    routes = []
    for route in args.route:
        listen, _, target = route.partition("=")
        routes.append((_address(listen), _address(target)))
    asyncio.run(serve(routes, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
