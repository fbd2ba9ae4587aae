"""`leader:app` and `follower:app`, built on first use rather than on import.

uvicorn looks `app` up by name; a module-level `__getattr__` builds it then, from the
environment. Importing the module builds nothing, so the HA node (which builds its apps
itself, from its own settings) and the tests can import either role's module freely.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI


def lazy_app(namespace: dict[str, Any], build: Callable[[], FastAPI]) -> Callable[[str], FastAPI]:
    """A module `__getattr__` that builds `app` with `build()` once, and keeps it."""

    def __getattr__(name: str) -> FastAPI:
        if name == "app":
            built = namespace["app"] = build()
            return built
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    return __getattr__
