"""EDN, just enough for Jepsen's histories: read one value, write one value.

Jepsen, Knossos and Elle keep histories as EDN maps (``{:process 0, :type :invoke, :f
:read, :value nil}``). This reads maps, vectors, lists, sets, strings, keywords, numbers,
nil and booleans (no tagged literals), and writes the same.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Keyword:
    """An EDN keyword (``:ok``), kept apart from strings so that ``"ok"`` stays a string."""

    name: str

    def __str__(self) -> str:
        return ":" + self.name


_EDN_TOKEN = re.compile(
    r"""[\s,]+|;[^\n]*|(?P<open>\#\{|[{\[(])|(?P<close>[}\])])|"(?P<str>(?:[^"\\]|\\.)*)"|(?P<atom>[^\s,{}\[\]()";]+)""",
    re.DOTALL,
)
_EDN_INT = re.compile(r"[+-]?\d+N?")
_EDN_FLOAT = re.compile(r"[+-]?\d+(\.\d*)?([eE][+-]?\d+)?M?")
_EDN_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}


def _edn_string(body: str) -> str:
    def unescape(match: re.Match[str]) -> str:
        char = match.group(1)
        if char.startswith("u"):
            return chr(int(char[1:], 16))
        return _EDN_ESCAPES.get(char, char)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", unescape, body)


def _edn_atom(text: str) -> Any:
    if text == "nil":
        return None
    if text in ("true", "false"):
        return text == "true"
    if text.startswith(":"):
        return Keyword(text[1:])
    if _EDN_INT.fullmatch(text):
        return int(text.rstrip("N"))
    if _EDN_FLOAT.fullmatch(text):
        return float(text.rstrip("M"))
    return Keyword(text)  # a symbol: rare in histories, and kept apart from strings too


def parse_edn(text: str) -> Any:
    """One EDN value: maps, vectors, lists, sets, strings, keywords, numbers, nil, booleans.

    Maps come back as dicts (keyword keys as :class:`Keyword`), vectors and lists as lists,
    sets as frozensets. Enough for Jepsen's histories, not a general reader (no tags)."""
    stack: list[tuple[str, list[Any]]] = []
    result: list[Any] = []
    pos = 0
    while pos < len(text):
        match = _EDN_TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"cannot read EDN at character {pos + 1}: {text[pos : pos + 20]!r}")
        pos = match.end()
        if match.group("open"):
            stack.append((match.group("open"), []))
            continue
        if match.group("close"):
            if not stack:
                raise ValueError(f"unbalanced {match.group('close')!r} at character {pos}")
            opener, items = stack.pop()
            value = _edn_collection(opener, match.group("close"), items)
        elif match.group("str") is not None:
            value = _edn_string(match.group("str"))
        elif match.group("atom"):
            value = _edn_atom(match.group("atom"))
        else:
            continue  # whitespace, commas, comments
        (stack[-1][1] if stack else result).append(value)
    if stack:
        raise ValueError(f"unclosed {stack[-1][0]!r}")
    if len(result) != 1:
        raise ValueError(f"expected one EDN value, found {len(result)}")
    return result[0]


def _edn_collection(opener: str, closer: str, items: list[Any]) -> Any:
    if {"{": "}", "[": "]", "(": ")", "#{": "}"}[opener] != closer:
        raise ValueError(f"{opener!r} closed by {closer!r}")
    if opener == "{":
        if len(items) % 2:
            raise ValueError("a map with an odd number of forms")
        return {_hashable(items[i]): items[i + 1] for i in range(0, len(items), 2)}
    if opener == "#{":
        return frozenset(_hashable(item) for item in items)
    return items


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _hashable(v)) for k, v in value.items()))
    return value


def edn(value: Any) -> str:
    """`value` written as EDN: None as nil, dicts as maps (string keys stay strings),
    lists and tuples as vectors, :class:`Keyword` as keywords."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"EDN has no {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # EDN strings escape as JSON's do
    if isinstance(value, Keyword):
        return str(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{edn(k)} {edn(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + " ".join(edn(item) for item in value) + "]"
    if isinstance(value, set | frozenset):
        return "#{" + " ".join(sorted(edn(item) for item in value)) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as EDN")
