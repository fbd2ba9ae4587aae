"""The curl and Python examples of the README and the docs, found and checked.

tests/system/test_docs.py runs every example against a real cluster, so that an example
cannot drift from the API. This module is the pure part: finding the examples in Markdown,
rewriting the documented ports to a test cluster's, and comparing an answer with the output
the example shows.

Conventions the docs follow:

* An example is a `curl` command in a ```sh block (continued with `\\`), or a whole
  ```python block.
* The output it shows is the comment lines right after the command (`# {"key": ...}`), or a
  comment at the end of its line. A leading status (`# 503 {...}`, `# HTTP/1.1 412 ...`)
  is the status expected; otherwise 2xx. Every JSON field name shown must be in the answer;
  values differ from run to run (versions, latencies) and are not compared.
* `<!-- example: not run (why) -->` right before a block marks every example in it as one
  that cannot run in the suite (it needs docker, a frozen follower, etcd...), with the reason.
* The documented cluster is the one `make run` starts: the leader on :8000 and followers on
  :8001-8005 (`localhost` or 127.0.0.1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*example:\s*not run\s*\((.+)\)\s*-->\s*$")
FIELD = re.compile(r'"([A-Za-z_][\w-]*)"\s*:')
STATUS = re.compile(r"^(?:HTTP/1\.1 )?([1-5]\d\d)\b")
PORT = re.compile(r"\b(?:localhost|127\.0\.0\.1):(80\d\d)\b")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    kind: str  # "curl" or "python"
    code: str
    shown: str = ""
    not_run: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def status(self) -> int | None:
        """The status the shown output names; None: any 2xx."""
        match = STATUS.match(self.shown.strip())
        return int(match.group(1)) if match else None

    @property
    def fields(self) -> list[str]:
        """The JSON field names the shown output has, in order, once each."""
        return list(dict.fromkeys(FIELD.findall(self.shown)))

    @property
    def streams(self) -> bool:
        """A curl that reads a stream (`/watch`): it runs for a moment and is stopped."""
        return self.kind == "curl" and "/watch" in self.code


def find_examples(path: Path, root: Path) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    examples: list[Example] = []
    relative = path.relative_to(root)
    i = 0
    pending_not_run: str | None = None
    while i < len(lines):
        marker = NOT_RUN.match(lines[i].strip())
        if marker:
            pending_not_run = marker.group(1)
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].strip():
                pending_not_run = None  # a marker applies to the very next block only
            i += 1
            continue
        language, start = fence.group(2), i + 1
        end = start
        while end < len(lines) and not FENCE.match(lines[end]):
            end += 1
        block = [line.removeprefix(fence.group(1)) for line in lines[start:end]]
        if language in ("sh", "bash", "console"):
            for first, command, shown in curl_commands(block):
                examples.append(
                    Example(relative, start + first + 1, "curl", command, shown, pending_not_run)
                )
        elif language == "python":
            examples.append(
                Example(relative, start + 1, "python", "\n".join(block), "", pending_not_run)
            )
        pending_not_run = None
        i = end + 1
    return examples


def curl_commands(block: list[str]) -> Iterator[tuple[int, str, str]]:
    """(index of its first line, the command, the output shown) for each curl in a block."""
    i = 0
    while i < len(block):
        first = i
        parts = [block[i]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(block):
            i += 1
            parts.append(block[i])
        i += 1
        command = " ".join(part.rstrip().removesuffix("\\").strip() for part in parts)
        command, inline = split_comment(command)
        if not re.match(r"^(?:[A-Z_]+=\S+\s+)*curl\s", command):
            continue
        shown = [inline] if inline else []
        while i < len(block) and block[i].lstrip().startswith("#"):
            shown.append(block[i].lstrip().removeprefix("#").strip())
            i += 1
        yield first, command, " ".join(shown)


def split_comment(command: str) -> tuple[str, str]:
    """A command and its trailing comment (`cmd   # shown`): a `#` after whitespace, outside
    quotes."""
    quote: str | None = None
    for index, char in enumerate(command):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and index > 0 and command[index - 1].isspace():
            return command[:index].rstrip(), command[index + 1 :].strip()
    return command, ""


def rewrite_ports(text: str, ports: dict[int, str]) -> str:
    """The documented 127.0.0.1:800N (or localhost:800N) as the test cluster's host:port;
    a KeyError names a port the cluster does not have."""

    def replace(match: re.Match[str]) -> str:
        return ports[int(match.group(1))]

    return PORT.sub(replace, text)


def missing_fields(shown: list[str], answer: str) -> list[str]:
    """The shown field names that appear nowhere in the answer's JSON (a body, or the
    `data:` lines of a stream)."""
    documents: list[Any] = []
    for candidate in [
        answer,
        *(line[6:] for line in answer.splitlines() if line.startswith("data: ")),
    ]:
        try:
            documents.append(json.loads(candidate))
        except ValueError:
            continue
    present: set[str] = set()
    for document in documents:
        present |= keys_in(document)
    return [name for name in shown if name not in present]


def keys_in(document: Any) -> set[str]:
    if isinstance(document, dict):
        found = set(document)
        for value in document.values():
            found |= keys_in(value)
        return found
    if isinstance(document, list):
        return set().union(*(keys_in(item) for item in document)) if document else set()
    return set()
