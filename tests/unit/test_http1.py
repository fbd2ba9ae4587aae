"""The one HTTP/1.1 response parser the transport and the load client share, on byte strings."""

import asyncio

import pytest

from kv.network.http1 import parse_status_line, read_body, read_head


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def response(data: bytes) -> tuple[int, bytes, bool]:
    reader = reader_of(data)
    head = await read_head(reader)
    return head.status, await read_body(reader, head), head.keep_alive


async def test_content_length_body():
    raw = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{"a":1}'
    assert await response(raw) == (200, b'{"a":1}', True)


async def test_chunked_body_with_trailers_and_connection_close():
    raw = (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\n"
    )
    assert await response(raw) == (503, b"Wikipedia", False)


async def test_no_body_and_bare_newlines():
    assert await response(b"HTTP/1.1 204 No Content\n\n") == (204, b"", True)


async def test_header_lookup_is_case_insensitive_and_takes_the_last_value():
    head = await read_head(reader_of(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\n\r\n"))
    assert head.header(b"x-a") == b"2" and head.headers[0] == (b"X-A", b"1")


@pytest.mark.parametrize("line", [b"SPDY 200 OK\r\n", b"HTTP/1.1 OK\r\n", b"garbage\r\n"])
def test_a_bad_status_line_is_a_value_error(line: bytes):
    with pytest.raises(ValueError, match="bad status line"):
        parse_status_line(line)


async def test_a_header_without_a_colon_is_a_value_error():
    with pytest.raises(ValueError, match="bad header line"):
        await read_head(reader_of(b"HTTP/1.1 200 OK\r\nnonsense\r\n\r\n"))


async def test_a_response_cut_short_is_an_incomplete_read():
    with pytest.raises(asyncio.IncompleteReadError):
        await response(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
    with pytest.raises(asyncio.IncompleteReadError):
        await read_head(reader_of(b"HTTP/1.1 200 OK\r\nx: 1\r\n"))
    with pytest.raises(ConnectionResetError):
        await read_head(reader_of(b""))
