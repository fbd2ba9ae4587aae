"""Markers by folder: tests/unit (pure, no sockets), tests/app (in-process ASGI), tests/system
(real processes on loopback). `pytest -m unit`, `-m "not slow"` and so on select by them."""

from pathlib import Path

import pytest

KINDS = ("unit", "app", "system", "partition")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        kind = next((k for k in KINDS if k in parts), "system")  # test_integration.py: system
        item.add_marker(getattr(pytest.mark, kind))
