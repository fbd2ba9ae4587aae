"""Client histories as data: Jepsen's events, Porcupine's operations, and their files.

A history is what clients saw, nothing else: every operation is recorded when it is
invoked and again when it completes, as Jepsen does:

* ``ok``: it took effect (or observed something), and its result is known;
* ``fail``: it surely did not take effect;
* ``info``: unknown; it may take effect at any time after its invocation, or never
  (a timeout, a connection lost). An operation still open at the end is unknown too.

:func:`operations` pairs the events into Porcupine-style :class:`Operation` records, one
per logical operation: a call and a return time, the client, an input and an output.
An unknown operation returns at infinity and its output is :data:`UNKNOWN`, which a model
accepts as any output. The checker (``tools/linearizability.py``) sees only those.

Three formats are read (``jepsen-register``, ``edn-kv``, ``ours``) and two are written:
``ours`` through :class:`HistoryRecorder`, and EDN (:func:`to_edn`) for Knossos, Elle or
Porcupine. ``docs/testing.md`` ("Checking histories") documents each field.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tools.edn import Keyword, edn, parse_edn

FORMATS: Final = ("jepsen-register", "edn-kv", "ours")
EVENT_TYPES: Final = ("invoke", "ok", "fail", "info")
OURS_FS: Final = ("write", "delete", "read")
JSONL_HEADER: Final = {"history": "replicated-kv", "format_version": 1}


class HistoryError(ValueError):
    """A history file that cannot be read as its format says: the message names the line."""


class _Unknown:
    """The output of an operation whose outcome is unknown: a model accepts it as any."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a history: an invocation or a completion, Jepsen style.

    `op` ties a completion to its invocation when the format numbers operations (ours);
    without it (Jepsen's logs) a completion belongs to its process's open invocation.
    `extra` holds a format's own fields (ours: ``status``, ``version``, ``if_version``...).
    """

    type: str
    process: int
    f: str
    key: str | None
    value: Any
    time: float
    op: int | None = None
    line: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class History:
    """The events of one history, in the order they happened, and the format they came in."""

    format: str
    events: tuple[Event, ...]
    source: str = "<memory>"


@dataclass(frozen=True, slots=True)
class Operation:
    """One logical operation, Porcupine style: `call` and `ret` bound the interval in which
    it took effect (closed: equal times count as concurrent); `ret` is infinite and
    `output` is UNKNOWN when its outcome is unknown. `input` and `output` are the
    format's small tuples, read by the matching model."""

    index: int
    client: int
    key: str | None
    input: Any
    output: Any
    call: float
    ret: float
    call_line: int = 0
    return_line: int = 0

    @property
    def unknown(self) -> bool:
        return self.output is UNKNOWN


# -- jepsen-register: Jepsen's etcd logs ---------------------------------------------------

_JEPSEN_LINE = re.compile(
    r"^INFO\s+jepsen\.util\s+-\s+(?P<process>\d+)\s+:(?P<type>invoke|ok|fail|info)"
    r"\s+:(?P<f>read|write|cas)\s+(?P<value>.*?)\s*$"
)


def read_jepsen_register(path: str | Path) -> History:
    """A Jepsen log of one register (``INFO  jepsen.util - 3	:invoke	:write	4``).

    Lines that are not operations (other loggers, blank lines) are skipped, as Jepsen's own
    tools do; a file with no operation at all is an error. Values are EDN: ``nil``, an
    integer, ``[old new]`` for a cas, ``:timed-out`` for a completion without a result."""
    events: list[Event] = []
    for number, text in enumerate(_lines(path), start=1):
        match = _JEPSEN_LINE.match(text)
        if match is None:
            continue
        try:
            value = parse_edn(match.group("value")) if match.group("value") else None
        except ValueError as error:
            raise HistoryError(f"{path}:{number}: {error}") from None
        events.append(
            Event(
                match.group("type"),
                int(match.group("process")),
                match.group("f"),
                None,
                value,
                float(len(events)),
                line=number,
            )
        )
    if not events:
        raise HistoryError(f"{path}: no Jepsen operation lines (INFO  jepsen.util - P :type :f v)")
    return History("jepsen-register", tuple(events), str(path))


# -- edn-kv: one Clojure map per line ------------------------------------------------------


def read_edn_kv(path: str | Path) -> History:
    """Jepsen's EDN maps, one a line: ``{:process 0, :type :invoke, :f :get, :key "7",
    :value nil}``. An optional ``:time`` is used as the time; otherwise the line order is."""
    events: list[Event] = []
    for number, text in enumerate(_lines(path), start=1):
        if not text.strip() or text.lstrip().startswith(";"):
            continue
        try:
            event = parse_edn(text)
        except ValueError as error:
            raise HistoryError(f"{path}:{number}: {error}") from None
        if not isinstance(event, dict):
            raise HistoryError(f"{path}:{number}: expected a map, read {type(event).__name__}")
        fields = {k.name if isinstance(k, Keyword) else str(k): v for k, v in event.items()}
        events.append(_edn_event(fields, number, len(events), str(path)))
    if not events:
        raise HistoryError(f"{path}: no events")
    return History("edn-kv", tuple(events), str(path))


_EDN_OWN: Final = ("type", "f", "process", "key", "value", "time")


def _edn_event(fields: dict[str, Any], number: int, ordinal: int, path: str) -> Event:
    where = f"{path}:{number}"
    kind, f, process = fields.get("type"), fields.get("f"), fields.get("process")
    if not isinstance(kind, Keyword) or kind.name not in EVENT_TYPES:
        raise HistoryError(f"{where}: :type must be one of :invoke :ok :fail :info, not {kind}")
    if not isinstance(f, Keyword):
        raise HistoryError(f"{where}: :f must be a keyword such as :get, not {f!r}")
    if not isinstance(process, int) or isinstance(process, bool):
        raise HistoryError(f"{where}: :process must be an integer, not {process!r}")
    key = fields.get("key")
    when = fields.get("time", ordinal)
    if not isinstance(when, int | float):
        raise HistoryError(f"{where}: :time must be a number, not {when!r}")
    return Event(
        kind.name,
        process,
        f.name,
        None if key is None else str(key),
        fields.get("value"),
        float(when),
        line=number,
        extra={k: v for k, v in fields.items() if k not in _EDN_OWN},
    )


# -- ours: the store's histories as JSON lines ---------------------------------------------


def read_ours(path: str | Path) -> History:
    """The JSON-lines history :class:`HistoryRecorder` writes (fields in docs/testing.md)."""
    events: list[Event] = []
    invoked: dict[int, Event] = {}
    for number, text in enumerate(_lines(path), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise HistoryError(f"{path}:{number}: not JSON: {error}") from None
        if not isinstance(record, dict):
            raise HistoryError(f"{path}:{number}: expected a JSON object")
        if "history" in record:
            if record.get("format_version") != JSONL_HEADER["format_version"]:
                raise HistoryError(f"{path}:{number}: unknown format_version in {record}")
            continue
        try:
            event = _ours_event(record, number, invoked)
        except (KeyError, TypeError, ValueError) as error:
            raise HistoryError(f"{path}:{number}: {error}") from None
        events.append(event)
    if not events:
        raise HistoryError(f"{path}: no events")
    return History("ours", tuple(events), str(path))


_OURS_EXTRA: Final = (
    "if_version",
    "idempotency_key",
    "status",
    "version",
    "current_version",
    "attempts",
    "node",
    "error",
)


def _ours_event(record: dict[str, Any], number: int, invoked: dict[int, Event]) -> Event:
    kind, op = record["type"], record["op"]
    if kind not in EVENT_TYPES:
        raise ValueError(f"type must be one of {', '.join(EVENT_TYPES)}, not {kind!r}")
    if not isinstance(op, int) or isinstance(op, bool):
        raise ValueError(f"op must be an integer, not {op!r}")
    if kind == "invoke":
        if op in invoked:
            raise ValueError(f"op {op} invoked twice")
        f, key, process = record["f"], record["key"], record["process"]
        if f not in OURS_FS:
            raise ValueError(f"f must be one of {', '.join(OURS_FS)}, not {f!r}")
        if not isinstance(key, str):
            raise ValueError(f"key must be a string, not {key!r}")
        if not isinstance(process, int) or isinstance(process, bool):
            raise ValueError(f"process must be an integer, not {process!r}")
        _check_condition(record.get("if_version"))
    else:
        start = invoked.get(op)
        if start is None:
            raise ValueError(f"op {op} completes but was never invoked")
        f, key, process = start.f, start.key, start.process
        for name, expected in (("f", f), ("key", key), ("process", process)):
            if name in record and record[name] != expected:
                raise ValueError(f"op {op}: {name} {record[name]!r} differs from its invoke's")
    when = record["time"]
    if not isinstance(when, int | float) or isinstance(when, bool):
        raise ValueError(f"time must be a number, not {when!r}")
    event = Event(
        kind,
        process,
        f,
        key,
        record.get("value"),
        float(when),
        op=op,
        line=number,
        extra={name: record[name] for name in _OURS_EXTRA if record.get(name) is not None},
    )
    if kind == "invoke":
        invoked[op] = event
    return event


def _check_condition(condition: Any) -> None:
    ok = condition is None or condition == "*"
    ok = ok or (isinstance(condition, int) and not isinstance(condition, bool) and condition >= 0)
    if not ok:
        raise ValueError(f'if_version must be a version >= 0, "*" or null, not {condition!r}')


class HistoryRecorder:
    """Records what clients of the store saw, for :func:`read_ours` and the checker.

    One logical operation is one invoke and at most one completion, however many HTTP
    requests it took: a write retried with the same Idempotency-Key is the same operation,
    so call :meth:`retry` between attempts (it only counts them) and complete it once.
    Append-only under a lock, and every method is synchronous, so clients on one asyncio
    loop (or on threads) may share one recorder. `clock` is time.monotonic unless injected.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._open: dict[int, dict[str, Any]] = {}
        self._attempts: dict[int, int] = {}
        self._next_op = 0

    def invoke(
        self,
        process: int,
        f: str,
        key: str,
        value: Any = None,
        *,
        if_version: int | str | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Record the start of an operation (f: write, delete or read); returns its op id.

        `value` is a write's value (any JSON); `if_version` a conditional write's or
        delete's expectation: a version, 0 for "only if absent", "*" for "only if present".
        """
        if f not in OURS_FS:
            raise ValueError(f"f must be one of {', '.join(OURS_FS)}, not {f!r}")
        if f != "write" and value is not None:
            raise ValueError(f"a {f} has no value")
        if f == "read" and if_version is not None:
            raise ValueError("a read has no if_version")
        _check_condition(if_version)
        json.dumps(value)  # refuse what cannot be written now, not at the end
        with self._lock:
            op = self._next_op
            self._next_op += 1
            record: dict[str, Any] = {"type": "invoke", "op": op, "process": process, "f": f}
            record |= {"key": key, "value": value, "if_version": if_version}
            record |= {"idempotency_key": idempotency_key, "time": self._clock()}
            self._records.append(record)
            self._open[op] = record
            self._attempts[op] = 1
        return op

    def retry(self, op: int) -> None:
        """Note one more request for `op` (a retry with the same Idempotency-Key)."""
        with self._lock:
            self._invoked(op)
            self._attempts[op] += 1

    def ok(
        self,
        op: int,
        *,
        status: int = 200,
        version: int | None = None,
        value: Any = None,
        node: str | None = None,
    ) -> None:
        """It took effect or observed the key: a write's or delete's `version`, a read's
        `value` and `version` (status 200), or status 404 for a read or delete of an
        absent key."""
        with self._lock:
            start = self._invoked(op)
            f = start["f"]
            if status == 404:
                if f == "write":
                    raise ValueError("a write cannot find its key absent (404)")
            elif not 200 <= status < 300:
                raise ValueError(f"ok means status 2xx or 404, not {status}")
            elif not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"an ok {f} with status {status} needs its version")
            if value is not None and f != "read":
                raise ValueError(f"only a read's completion carries a value, not a {f}'s")
            json.dumps(value)
            self._complete(op, "ok", status=status, version=version, value=value, node=node)

    def fail(
        self,
        op: int,
        *,
        status: int,
        current_version: int | None = None,
        error: str | None = None,
        node: str | None = None,
    ) -> None:
        """It surely did not take effect: 412 with the key's `current_version`, 404 for a
        delete of an absent key, or any other status that the caller knows changed nothing
        (such a completion is dropped by the checker: it observed nothing)."""
        with self._lock:
            start = self._invoked(op)
            if status == 412 and start["f"] == "read":
                raise ValueError("a read cannot get 412")
            self._complete(
                op, "fail", status=status, current_version=current_version, error=error, node=node
            )

    def info(
        self,
        op: int,
        *,
        error: str | None = None,
        status: int | None = None,
        node: str | None = None,
    ) -> None:
        """Its outcome is unknown (a timeout, a lost connection, a 503 after the write
        was applied): it may take effect at any time after its invoke, or never."""
        with self._lock:
            self._invoked(op)
            self._complete(op, "info", status=status, error=error, node=node)

    def _invoked(self, op: int) -> dict[str, Any]:
        start = self._open.get(op)
        if start is None:
            done = 0 <= op < self._next_op
            raise ValueError(f"op {op} {'is already complete' if done else 'was never invoked'}")
        return start

    def _complete(self, op: int, kind: str, **fields: Any) -> None:
        start = self._open.pop(op)
        record = {"type": kind, "op": op, "process": start["process"], "f": start["f"]}
        record["key"] = start["key"]
        record |= {name: value for name, value in fields.items() if value is not None}
        record |= {"attempts": self._attempts.pop(op), "time": self._clock()}
        self._records.append(record)

    @property
    def open_ops(self) -> list[int]:
        """Ops invoked and not completed: unknown outcome, as Jepsen counts them."""
        with self._lock:
            return sorted(self._open)

    def lines(self) -> list[str]:
        """The history as JSON lines, header first."""
        with self._lock:
            records = list(self._records)
        drop_none = ("value", "if_version", "idempotency_key")
        return [json.dumps(JSONL_HEADER)] + [
            json.dumps({k: v for k, v in r.items() if v is not None or k not in drop_none})
            for r in records
        ]

    def write_jsonl(self, path: str | Path) -> None:
        """Write the history for ``python -m tools.check_history --format ours``."""
        Path(path).write_text("\n".join(self.lines()) + "\n", encoding="utf-8")

    def history(self) -> History:
        """The history recorded so far, as :func:`read_ours` would read it back."""
        invoked: dict[int, Event] = {}
        events = []
        for number, text in enumerate(self.lines()[1:], start=2):
            events.append(_ours_event(json.loads(text), number, invoked))
        return History("ours", tuple(events))


# -- from events to operations -------------------------------------------------------------


def read_history(path: str | Path, format: str) -> History:
    """Read `path` as `format` (one of FORMATS); HistoryError or OSError if it cannot be."""
    readers = {"jepsen-register": read_jepsen_register, "edn-kv": read_edn_kv, "ours": read_ours}
    if format not in readers:
        raise HistoryError(f"unknown format {format!r}: one of {', '.join(FORMATS)}")
    return readers[format](path)


def operations(history: History) -> list[Operation]:
    """Pair the history's events into operations, with the inputs and outputs of its model.

    Reads whose outcome is unknown, and operations that surely changed nothing and observed
    nothing (a failed write without a 412, say), are dropped: they could be placed anywhere.
    """
    pairs = _pairs(history)
    encode = {"jepsen-register": _register_op, "edn-kv": _kv_op, "ours": _ours_op}[history.format]
    result: list[Operation] = []
    for start, end in pairs:
        where = f"{history.source}:{end.line if end else start.line}"
        try:
            encoded = encode(start, end)
        except (KeyError, TypeError, ValueError) as error:
            raise HistoryError(f"{where}: {error}") from None
        if encoded is None:
            continue
        inp, out = encoded
        unknown = out is UNKNOWN
        result.append(
            Operation(
                len(result),
                start.process,
                start.key,
                inp,
                out,
                start.time,
                math.inf if unknown else end.time if end else math.inf,
                start.line,
                0 if end is None else end.line,
            )
        )
    return result


def _pairs(history: History) -> list[tuple[Event, Event | None]]:
    """Each invocation with its completion (None while open), in the order of invocation."""
    pairs: list[list[Any]] = []
    open_by: dict[Any, list[Any]] = {}
    for event in history.events:
        slot = event.op if event.op is not None else ("process", event.process)
        if event.type == "invoke":
            if slot in open_by:
                raise HistoryError(
                    f"{history.source}:{event.line}: process {event.process} invokes again "
                    f"before its operation of line {open_by[slot][0].line} completed"
                )
            pair = [event, None]
            pairs.append(pair)
            open_by[slot] = pair
            continue
        started = open_by.pop(slot, None)
        if started is None:
            raise HistoryError(
                f"{history.source}:{event.line}: a completion ({event.type} {event.f}) "
                f"of process {event.process} that invoked nothing"
            )
        if started[0].f != event.f:
            raise HistoryError(
                f"{history.source}:{event.line}: completes a {event.f}, but process "
                f"{event.process} invoked a {started[0].f} (line {started[0].line})"
            )
        started[1] = event
    return [(start, end) for start, end in pairs]


def _outcome(end: Event | None) -> str:
    return "info" if end is None else end.type


def _register_op(start: Event, end: Event | None) -> tuple[Any, Any] | None:
    """Jepsen's etcd register: inputs ("read",) ("write", v) ("cas", old, new); outputs a
    read's value (None for nil), None for a write, a cas's success as a bool."""
    outcome = _outcome(end)
    if start.f == "read":
        if outcome != "ok":
            return None  # a timed-out read: no result, no effect
        assert end is not None
        return ("read",), _register_value(end.value)
    if start.f == "write":
        if outcome == "fail":
            return None
        return ("write", _register_value(start.value)), UNKNOWN if outcome == "info" else None
    value = start.value
    if not (isinstance(value, list) and len(value) == 2):
        raise ValueError(f"a cas takes [old new], not {edn(value)}")
    inp = ("cas", _register_value(value[0]), _register_value(value[1]))
    return inp, UNKNOWN if outcome == "info" else outcome == "ok"


def _register_value(value: Any) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        return value
    raise ValueError(f"a register holds integers, strings or nil, not {edn(value)}")


def _kv_op(start: Event, end: Event | None) -> tuple[Any, Any] | None:
    """Porcupine's kv: inputs ("get",) ("put", v) ("append", v); a get's output is the string
    read, a put's or append's None."""
    outcome = _outcome(end)
    if start.key is None:
        raise ValueError(f"a {start.f} without a :key")
    if start.f in ("get", "read"):
        if outcome != "ok":
            return None
        assert end is not None
        return ("get",), _kv_string(end.value)
    if start.f not in ("put", "write", "append"):
        raise ValueError(f"edn-kv operations are get, put and append, not :{start.f}")
    if outcome == "fail":
        return None
    f = "append" if start.f == "append" else "put"
    return (f, _kv_string(start.value)), UNKNOWN if outcome == "info" else None


def _kv_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ValueError(f"edn-kv values are strings, not {edn(value)}")


def canonical(value: Any) -> str:
    """A JSON value as one string, so that equal values compare and hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _ours_op(start: Event, end: Event | None) -> tuple[Any, Any] | None:
    """The store's versioned keys. Inputs: ("write", value, cond), ("delete", cond),
    ("read",) with value as canonical JSON and cond None, a version, 0 or "*". Outputs:
    ("ok", version), ("mismatch", current_version or None), ("absent",),
    ("value", value, version), or UNKNOWN."""
    outcome, f = _outcome(end), start.f
    cond = start.extra.get("if_version")
    inp: tuple[Any, ...] = {
        "write": ("write", canonical(start.value), cond),
        "delete": ("delete", cond),
        "read": ("read",),
    }[f]
    if outcome == "info":
        return None if f == "read" else (inp, UNKNOWN)
    assert end is not None
    status = end.extra.get("status")
    if status == 412 and f != "read":
        current = end.extra.get("current_version")
        return inp, ("mismatch", current)
    if status == 404 and f != "write":
        return inp, ("absent",)
    if outcome == "fail":
        return None  # did not take effect, and observed nothing
    if not isinstance(status, int) or not 200 <= status < 300:
        raise ValueError(f"an ok {f} needs status 2xx, or 404 (read, delete), not {status!r}")
    version = end.extra.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"an ok {f} needs its version")
    if f == "read":
        return inp, ("value", canonical(end.value), version)
    return inp, ("ok", version)


# -- EDN export ----------------------------------------------------------------------------


def to_edn(history: History) -> str:
    """The history as Jepsen EDN, one map a line, for Knossos, Elle or Porcupine.

    Each event becomes ``{:process P, :type :invoke, :f :write, :key "k", :value v,
    :time T, :index I}`` (no :key for a single register; T in nanoseconds from the first
    event for ours, the times as read for the others), plus ours's own fields
    (:version, :if-version, :status, :current-version). Jepsen matches a completion to its
    process's open invocation, and a process whose operation ended unknown invokes nothing
    more, so such a process's later operations get fresh process numbers.
    """
    lines = []
    first = history.events[0].time if history.events else 0.0
    scale = 1e9 if history.format == "ours" else 1.0  # ours: seconds; else: as read
    fresh = max((e.process for e in history.events), default=-1) + 1
    renamed: dict[Any, int] = {}  # an op's slot -> the process it is exported as
    busy: set[int] = set()  # processes with an open or unknown operation
    for index, event in enumerate(history.events):
        slot = event.op if event.op is not None else ("process", event.process)
        if event.type == "invoke":
            process = event.process
            if process in busy:
                process, fresh = fresh, fresh + 1
            renamed[slot] = process
            busy.add(process)
        else:
            process = renamed.pop(slot, event.process)
            if event.type != "info":
                busy.discard(process)
        fields: dict[Any, Any] = {Keyword("process"): process, Keyword("type"): Keyword(event.type)}
        fields[Keyword("f")] = Keyword(event.f)
        if event.key is not None:
            fields[Keyword("key")] = event.key
        fields[Keyword("value")] = event.value
        for name, value in event.extra.items():
            if name not in ("time", "index"):
                fields[Keyword(name.replace("_", "-"))] = value
        fields[Keyword("time")] = round((event.time - first) * scale)
        fields[Keyword("index")] = index
        lines.append(edn(fields))
    return "\n".join(lines) + "\n"


def _lines(path: str | Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        yield from (line.rstrip("\n").rstrip("\r") for line in handle)
