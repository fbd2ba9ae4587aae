"""Reading an HTTP/1.1 response off an asyncio stream: the one parser the lean clients share.

The leader's replication transport (transport.py) and the load generator
(tools/loadgen.py) both speak keep-alive HTTP/1.1 to uvicorn, and both need the
same three things: the status, the headers, and a body framed by Content-Length
or chunked encoding. Malformed input raises ValueError; a connection closed
mid-response raises asyncio.IncompleteReadError (or ConnectionResetError before
the first byte).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

MAX_HEADER_LINES = 100


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]  # as sent, names and values stripped

    def header(self, name: bytes) -> bytes | None:
        """The last value of a header, by lower-case name."""
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value
        return found

    @property
    def chunked(self) -> bool:
        return (self.header(b"transfer-encoding") or b"").lower() == b"chunked"

    @property
    def content_length(self) -> int:
        return int(self.header(b"content-length") or b"0")

    @property
    def keep_alive(self) -> bool:
        return (self.header(b"connection") or b"").lower() != b"close"


def parse_status_line(line: bytes) -> int:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {line[:80]!r}")
    return int(parts[1])


async def read_head(reader: asyncio.StreamReader) -> ResponseHead:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before a response")
    status = parse_status_line(status_line)
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return ResponseHead(status, headers)
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError(f"bad header line {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    raise ValueError("too many header lines")


async def read_body(reader: asyncio.StreamReader, head: ResponseHead) -> bytes:
    if head.chunked:
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)  # the CRLF after each chunk
    length = head.content_length
    return await reader.readexactly(length) if length else b""
