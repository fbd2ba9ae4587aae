"""The write fast path's query parsing: what it answers itself, and what it leaves to FastAPI."""

import pytest

from kv.web.fastpath import plain_parameters


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (None, None)),
        (b"w=3", (3, None)),
        (b"w=0&timeout_ms=250.5", (0, 250.5)),
        (b"timeout_ms=3600000", (None, 3_600_000.0)),
    ],
)
def test_plain_parameters_are_parsed(query: bytes, expected: tuple) -> None:
    assert plain_parameters(query) == expected


@pytest.mark.parametrize(
    "query",
    [b"w=-1", b"w=x", b"w=1&w=2", b"timeout_ms=0", b"timeout_ms=nan", b"timeout_ms=inf",
     b"timeout_ms=3600001", b"verbose=1", b"w="],
)  # fmt: skip
def test_anything_else_is_left_to_fastapi(query: bytes) -> None:
    assert plain_parameters(query) is None
