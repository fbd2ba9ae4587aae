"""Records: one versioned write or deletion (an :class:`Entry`), its JSON, and what a version says.

A version carries its term in its high digits: ``version = (term - 1) * TERM_STRIDE + n``.
Comparing two versions as integers therefore compares them by (term, n), and a
leader that only ever assigns inside its own term can never assign a version that
an earlier leader assigned. The first leader of a fresh cluster is term 1, so its
versions are simply 1, 2, 3...
"""

from __future__ import annotations

import json
import operator
from typing import Any

import orjson

from kv.core.requests import RequestTag

TERM_STRIDE = 1_000_000_000
"""Versions per term. Term t owns versions (t-1)*TERM_STRIDE+1 .. t*TERM_STRIDE, so
versions stay below 2**53 (exact in JavaScript) for nine million terms."""


def term_of(version: int) -> int:
    """The term that assigned `version`; 0 for "no version"."""
    return 0 if version <= 0 else (version - 1) // TERM_STRIDE + 1


def first_version(term: int) -> int:
    return (term - 1) * TERM_STRIDE + 1


BY_VERSION = operator.attrgetter("version")
"""Sort key for entries: about twice as fast as a lambda, for a million in a snapshot."""


_TAILS = (b',"deleted":false}', b',"deleted":true}')


class TermExhaustedError(RuntimeError):
    """The current term has no versions left (or a newer term was seen): start a new term."""


class Entry:
    """One versioned write or deletion, as shipped to followers, logged and paged; a store
    holds each key packed (:mod:`kv.core.store`) and makes its entry when asked.

    An entry holds its value only as JSON (`encoding`): every follower, log and page needs
    that JSON, and a small dict costs more than it. `value` is decoded from it when asked
    (a read, a merge of two versions). Treat an entry as immutable: outboxes, feeds and
    logs share it.
    """

    __slots__ = ("deleted", "encoding", "key", "request", "version")

    key: str
    version: int
    deleted: bool
    encoding: bytes
    request: RequestTag | None

    def __init__(
        self,
        key: str,
        value: Any,
        version: int,
        deleted: bool = False,
        encoding: bytes = b"",
        request: RequestTag | None = None,
    ) -> None:
        """`encoding`, when given, is this entry's JSON (`encoded`), and `value` is not kept;
        without it, `value` is encoded now."""
        self.key = key
        self.version = version
        self.deleted = deleted
        self.request = request
        self.encoding = encoding or entry_json(
            dump_trusted(key), dump_trusted(value), version, deleted
        )

    @property
    def value(self) -> Any:
        """The value, decoded from the entry's JSON (None for a deletion)."""
        # The json module, not orjson: orjson reads an integer past 64 bits as a float.
        return None if self.deleted else json.loads(self.encoding)["value"]

    @property
    def value_json(self) -> bytes:
        """The value's JSON, cut out of the entry's (``null`` for a deletion)."""
        # In the layout entry_json writes, the key is a JSON string, in which every quote is
        # escaped, so the first `,"value":` after it is the field's, and nothing after the
        # value is a string. JSON in another layout (a hand-made page line) is encoded again.
        encoding = self.encoding
        start = encoding.find(b',"value":', 7) + 9
        end = encoding.rfind(b',"version":')
        if 9 <= start <= end and encoding.startswith(b'{"key":') and encoding.endswith(_TAILS):
            return encoding[start:end]
        return dump_trusted(self.value)

    @property
    def wire(self) -> bytes:
        """The entry as replicas and logs carry it: `encoded`, plus its request tag if it
        has one. Clients never see the tag (reads, writes and /watch use `encoded`)."""
        if self.request is None:
            return self.encoding
        tag = f',"request":{{"id":{encode_json(self.request.id)},"digest":{self.request.digest}}}}}'
        return self.encoding[:-1] + tag.encode()

    @property
    def encoded(self) -> bytes:
        """The entry as compact JSON, made once: fanning it out to five followers, logging
        it and paging it out never serialise it again."""
        return self.encoding

    @classmethod
    def create(
        cls,
        key: str,
        value: Any,
        version: int,
        deleted: bool = False,
        value_json: str | None = None,
        request: RequestTag | None = None,
    ) -> Entry:
        """Build an entry; pass `value_json` when the value is encoded already (the leader's
        write path, which had to encode it to check its size). Raises ValueError for NaN."""
        if value_json is None:
            value_json = encode_json(value)
        encoding = entry_json(dump_trusted(key), value_json.encode(), version, deleted)
        return cls(key, None, version, deleted, encoding, request)

    @classmethod
    def from_json(cls, data: dict[str, Any], wire: bytes = b"") -> Entry:
        """An entry from its JSON object (a log record, a follower's page); `wire` is that
        JSON when it is at hand. Raises KeyError, TypeError or ValueError if malformed."""
        tag = data.get("request")
        request = None if tag is None else RequestTag(str(tag["id"]), int(tag["digest"]))
        encoding = wire if request is None else b""  # the tag is not in `encoded`
        return cls(
            data["key"],
            data["value"],
            int(data["version"]),
            bool(data["deleted"]),
            encoding,
            request,
        )

    @classmethod
    def from_wire(cls, wire: bytes) -> Entry:
        """An entry from its own JSON (`wire`: a log record, a line of a follower's page),
        parsed by orjson (about 3x faster) where that is exact enough.

        An untagged entry keeps `wire` itself as its JSON, and takes only its key, version
        and deletion mark from the parse, so a value that orjson reads inexactly (an integer
        past 64 bits becomes a float) is never used. A tagged entry's value is encoded again
        from the parse, so it is parsed by the json module, exactly; so is anything orjson
        refuses (the json module decides whether it is malformed). Raises KeyError,
        TypeError or ValueError if malformed."""
        try:
            fields: dict[str, Any] = orjson.loads(wire)
        except orjson.JSONDecodeError:
            fields = json.loads(wire)
        else:
            if "request" in fields:
                fields = json.loads(wire)
        return cls.from_json(fields, wire)

    def same_write(self, other: Entry) -> bool:
        """Whether `other` is this very write: same key, version and content."""
        return (
            self.version == other.version
            and self.key == other.key
            and self.deleted == other.deleted
            and (self.encoding == other.encoding or self.value == other.value)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and self.same_write(other)

    def __hash__(self) -> int:
        return hash((self.key, self.version, self.deleted))

    def __repr__(self) -> str:
        return (
            f"Entry(key={self.key!r}, value={self.value!r}, version={self.version}, "
            f"deleted={self.deleted})"
        )


def encode_json(value: Any) -> str:
    """Compact JSON. Raises ValueError for NaN and infinities, which JSON cannot carry."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dump_trusted(value: Any) -> bytes:
    """JSON of a value that was checked when it was written (no NaN), with orjson: about
    five times faster than the json module, which matters when a node encodes a million
    entries for a snapshot or a start-up read. Integers past 64 bits, which orjson refuses,
    go through the json module."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return encode_json(value).encode()


def entry_json(key_json: bytes, value_json: bytes, version: int, deleted: bool) -> bytes:
    flag = b"true" if deleted else b"false"
    return b'{"key":%b,"value":%b,"version":%d,"deleted":%b}' % (
        key_json,
        value_json,
        version,
        flag,
    )
