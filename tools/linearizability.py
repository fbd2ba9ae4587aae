"""A linearizability checker that knows nothing of the store: models and a search.

A model is four small functions, as in Porcupine: ``init()`` gives the first state,
``step(state, input, output)`` returns ``(legal, new_state)``, states are hashable and
compared with ``==``, and ``partition`` splits a history into independent ones (one per
key), each checked on its own: a key-value history is linearizable exactly when every
key's is (P-compositionality).

The search is Wing and Gong's, with Lowe's improvement, as Porcupine's checker.go does it:
the calls and returns sit in a doubly linked list in time order; the search tries, from
the front, a call whose operation can be applied to the current state, lifts it and its
return out of the list, and backtracks (unlifts) when the front is a return whose
operation it has not placed. A cache of (set of placed operations, state) pairs, the set
as an int bitset, stops it from exploring a configuration twice. An operation whose
outcome is unknown returns at infinity and matches any output, as in Porcupine and Knossos.

On a failure, the report shows the shortest prefix of the key's history that is already not
linearizable: it ends with the first return that every search path stopped at. The
longest partial linearization that got there, the state it left, and the operations that
could not be placed next are printed, as Knossos does.

Unknown operations and reads get shortcuts that keep the search complete (see _search);
tests/unit/test_check_history.py holds it to a brute-force search on random histories.
"""

from __future__ import annotations

import enum
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tools.history import UNKNOWN, Operation

Step = Callable[[Any, Any, Any], tuple[bool, Any]]


class Verdict(enum.Enum):
    OK = "linearizable"
    ILLEGAL = "not linearizable"
    UNKNOWN = "unknown"


def by_key(ops: Sequence[Operation]) -> list[list[Operation]]:
    """One sub-history per key, in key order: keys are independent registers."""
    groups: dict[Any, list[Operation]] = {}
    for op in ops:
        groups.setdefault(op.key, []).append(op)
    return [groups[key] for key in sorted(groups, key=lambda k: (k is not None, str(k)))]


def _whole(ops: Sequence[Operation]) -> list[list[Operation]]:
    return [list(ops)]


@dataclass(frozen=True)
class Model:
    """A sequential specification: what one object does, one operation at a time."""

    name: str
    init: Callable[[], Any]
    step: Step
    partition: Callable[[Sequence[Operation]], list[list[Operation]]] = by_key
    describe_op: Callable[[Any, Any], str] = lambda inp, out: f"{inp} -> {out}"
    describe_state: Callable[[Any], str] = repr
    read_only: Callable[[Any, Any], bool] = lambda inp, out: False
    """True only for an (input, output) that leaves every state where it is legal as it
    is (a read): the search then places it as soon as it is legal, trying nothing else."""


def _unknown_suffix(out: Any) -> str | None:
    return " -> ? (unknown outcome)" if out is UNKNOWN else None


# -- a register with compare-and-set (Jepsen's etcd test) ---------------------------------


def _register_step(state: Any, inp: Any, out: Any) -> tuple[bool, Any]:
    f = inp[0]
    if f == "read":
        return out is UNKNOWN or out == state, state
    if f == "write":
        return True, inp[1]
    matched = state == inp[1]  # cas(old, new)
    if out is UNKNOWN:
        return True, inp[2] if matched else state
    if out:
        return matched, inp[2]
    return not matched, state


def _register_op(inp: Any, out: Any) -> str:
    f = inp[0]
    if f == "read":
        return "read()" + (_unknown_suffix(out) or f" -> {_nil(out)}")
    if f == "write":
        return f"write({_nil(inp[1])})" + (_unknown_suffix(out) or "")
    result = _unknown_suffix(out) or (" -> ok" if out else " -> fail")
    return f"cas({_nil(inp[1])}, {_nil(inp[2])})" + result


def _nil(value: Any) -> str:
    return "nil" if value is None else str(value)


register_model = Model(
    "register",
    init=lambda: None,
    step=_register_step,
    partition=_whole,
    describe_op=_register_op,
    describe_state=_nil,
    read_only=lambda inp, out: inp[0] == "read" or (inp[0] == "cas" and out is False),
)
"""One register holding nil at first: read, write, and cas(old, new), whose failure says
that the register did not hold `old` (Porcupine's etcd model)."""


# -- a string per key with get, put and append (Porcupine's kv test) -----------------------


def _kv_step(state: Any, inp: Any, out: Any) -> tuple[bool, Any]:
    f = inp[0]
    if f == "get":
        return out is UNKNOWN or out == state, state
    if f == "put":
        return True, inp[1]
    return True, state + inp[1]


def _kv_op(inp: Any, out: Any) -> str:
    if inp[0] == "get":
        return "get()" + (_unknown_suffix(out) or f" -> {out!r}")
    return f"{inp[0]}({inp[1]!r})" + (_unknown_suffix(out) or "")


kv_model = Model(
    "kv",
    init=lambda: "",
    step=_kv_step,
    describe_op=_kv_op,
    describe_state=repr,
    read_only=lambda inp, out: inp[0] == "get",
)
"""Each key a string, "" at first: get, put, append (Porcupine's kv model)."""


# -- a versioned register per key (the store's keys) --------------------------------------
#
# A concrete state is (present, value, version, floor). `version` is -1 when unknown: a
# write whose outcome was unknown took effect, so its version is some integer above
# `floor`, the last version known before it. When the version is known, floor == version.
# A later observation (a read, a write's version, a 412's current version) pins it down.
# A conditional write of unknown outcome against an unknown version may or may not have
# matched, so the model is nondeterministic there: the state becomes a frozenset of the
# concrete states it may be in (Porcupine's NondeterministicModel, as a power set).

_ABSENT0 = (False, None, -1, 0)


def _holds(cond: Any, s: tuple[Any, ...], rewrites: bool) -> bool | None:
    """Whether a write conditional on `cond` would go ahead in `s`; None: cannot tell."""
    if cond is None:
        return True
    present = s[0]
    if cond == "*":
        return present
    if cond == 0:
        return not present
    if not present:
        return False
    version = s[2]
    if version >= 0:
        if rewrites and cond >= version:
            return None  # re-stamped to `cond` (or past it) unseen, or not
        return version == cond
    return None if cond > s[3] else False


def _below(s: tuple[Any, ...]) -> int:
    """Every later write's version is above this."""
    return s[2] if s[2] >= 0 else s[3]


def _mismatch(
    s: tuple[Any, ...], cond: Any, current: Any, rewrites: bool
) -> tuple[tuple[Any, ...], ...]:
    """Successors of a 412 that reported the key's `current` version (None: not reported)."""
    if _holds(cond, s, rewrites) is True:
        return ()
    if current is None:
        return (s,)
    present, value, version, floor = s
    if not present:
        return (s,) if current == 0 else ()
    if current == cond:
        return ()  # a 412 that says the key is at the version expected
    if version >= 0:
        if current == version:
            return (s,)
        if not (rewrites and current > version):
            return ()
    elif current <= floor:
        return ()
    return ((True, value, current, current),)


def _versioned_successors(
    s: tuple[Any, ...], inp: Any, out: Any, rewrites: bool
) -> tuple[tuple[Any, ...], ...]:
    f = inp[0]
    present, value, version, floor = s
    if f == "read":
        if out is UNKNOWN:
            return (s,)
        if out[0] == "absent":
            return () if present else (s,)
        if out[0] != "value" or not present or out[1] != value:
            return ()
        seen = out[2]
        if version >= 0:
            if seen == version:
                return (s,)
            if not (rewrites and seen > version):
                return ()
        elif seen <= floor:
            return ()
        return ((True, value, seen, seen),)
    cond = inp[2] if f == "write" else inp[1]
    holds = _holds(cond, s, rewrites)
    if out is not UNKNOWN and out[0] == "mismatch":
        return _mismatch(s, cond, out[1], rewrites)
    if holds is False:
        return (s,) if out is UNKNOWN else ()
    # with holds None (version unknown, or re-stamped) going ahead pins the version
    matched = (True, value, cond, cond) if holds is None else s
    if f == "write":
        if out is UNKNOWN:
            after = (True, inp[1], -1, _below(matched))
            return (after,) if holds else (after, s)
        if out[0] != "ok" or out[1] <= _below(matched):
            return ()
        return ((True, inp[1], out[1], out[1]),)
    # delete
    if not present:  # holds is True: the store finds nothing to delete (404)
        return (s,) if out is UNKNOWN or out[0] == "absent" else ()
    if out is UNKNOWN:
        after = (False, None, -1, _below(matched))
        return (after,) if holds else (after, s)
    if out[0] != "ok" or out[1] <= _below(matched):
        return ()
    return ((False, None, -1, out[1]),)


def versioned_model(rewrites: bool = False) -> Model:
    """A register per key holding (value, version), with conditional writes and deletes.

    Writes and deletes get versions that increase within a key in linearization order; a
    read returns the value and version of the last write, or absent after a delete (or
    before any write). A write or delete conditional on a version goes ahead only if the
    key is at it (0: absent; "*": present), else it answers 412 with the current version
    (0 when absent); a delete of an absent key answers 404. With `rewrites`, a key's
    version may also rise without a client's write (a store re-stamping a value it merged):
    a read or a 412 may then show a higher version for the same value.
    """

    def step(state: Any, inp: Any, out: Any) -> tuple[bool, Any]:
        if type(state) is tuple:
            after = _versioned_successors(state, inp, out, rewrites)
            if len(after) == 1:
                return True, after[0]
            if not after:
                return False, state
            return True, frozenset(after)
        union = frozenset(
            s for each in state for s in _versioned_successors(each, inp, out, rewrites)
        )
        if not union:
            return False, state
        return True, next(iter(union)) if len(union) == 1 else union

    return Model(
        "versioned" + (" (with rewrites)" if rewrites else ""),
        init=lambda: _ABSENT0,
        step=step,
        describe_op=_versioned_op,
        describe_state=_versioned_state,
        read_only=lambda inp, out: out is not UNKNOWN and out[0] == "absent",
    )


def _versioned_op(inp: Any, out: Any) -> str:
    f = inp[0]
    if f == "read":
        call = "read()"
    else:
        cond = inp[2] if f == "write" else inp[1]
        args = inp[1] if f == "write" else ""
        call = f"{f}({args})" + ("" if cond is None else f" if_version={cond}")
    if out is UNKNOWN:
        return call + " -> ? (unknown outcome)"
    tag = out[0]
    if tag == "ok":
        return f"{call} -> version {out[1]}"
    if tag == "mismatch":
        return f"{call} -> 412" + ("" if out[1] is None else f" (current version {out[1]})")
    if tag == "absent":
        return f"{call} -> 404 absent"
    return f"{call} -> {out[1]} @ version {out[2]}"


def _versioned_state(state: Any) -> str:
    if type(state) is frozenset:
        return " or ".join(sorted(_versioned_state(s) for s in state))
    present, value, version, floor = state
    if not present:
        return "absent" + (f" (versions so far up to {floor})" if floor else "")
    return f"{value} @ version " + (str(version) if version >= 0 else f"> {floor} (unknown)")


# -- the search ----------------------------------------------------------------------------


@dataclass
class Failure:
    """Why one sub-history is not linearizable, with the smallest failing window found."""

    model: Model
    key: Any
    ops: list[Operation]
    prefix_events: int
    """The history up to this many of the key's events (calls and returns) already fails."""
    stuck: Operation
    """The operation whose return every search path reached without having placed it."""
    linearized: list[Operation]
    """The longest partial linearization that reached that return."""
    open_ops: list[Operation]
    """Operations called before that return and not placed: none of them could go next."""

    def report(self, tail: int = 8) -> str:
        """The failure for a person: where it happens, what was placed, what could not be."""
        model = self.model
        label = "the register" if self.key is None else f"key {self.key!r}"
        completed = sum(1 for op in self.ops if op.ret <= self.stuck.ret)
        at = f" at line {self.stuck.return_line}" if self.stuck.return_line else ""
        lines = [
            f"{label}: not linearizable. The shortest failing prefix ends{at} with the return "
            f"of #{self.stuck.index}: {self.prefix_events} of the key's events, "
            f"{completed} of its {len(self.ops)} operations completed.",
        ]
        states = [model.init()]
        for op in self.linearized:
            states.append(model.step(states[-1], op.input, op.output)[1])
        shown = self.linearized[-tail:]
        skipped = len(self.linearized) - len(shown)
        lines.append(
            f"Longest partial linearization reaching it: {len(self.linearized)} operations"
            + (f" (the first {skipped} not shown; => the state after)" if skipped else "")
            + (":" if shown else ".")
        )
        for offset, op in enumerate(shown, start=skipped + 1):
            after = _short(model.describe_state(states[offset]), 48)
            lines.append(f"  {_op_line(model, op)}   => {after}")
        last = _short(model.describe_state(states[-1]))
        lines.append(f"It leaves {label} at {last}, and cannot place:")
        lines.append(f"  {_op_line(model, self.stuck)}   (must take effect before it returns)")
        others = [op for op in self.open_ops if op is not self.stuck]
        if others:
            lines.append("and no order of the other operations open then lets it be placed:")
            lines.extend(f"  {_op_line(model, op)}" for op in others[:tail])
            if len(others) > tail:
                lines.append(f"  ... and {len(others) - tail} more")
        return "\n".join(lines)


def _op_line(model: Model, op: Operation) -> str:
    if not op.call_line:
        where = ""
    elif not op.unknown:
        where = f"lines {op.call_line}-{op.return_line}"
    elif op.return_line:
        where = f"line {op.call_line}, outcome unknown at line {op.return_line}"
    else:
        where = f"line {op.call_line}, never completed"
    text = f"#{op.index:<5} process {op.client:<3} {_short(model.describe_op(op.input, op.output))}"
    return f"{text}  [{where}]" if where else text


def _short(text: str, width: int = 72) -> str:
    """Long values cut in the middle: their ends tell most (appends grow at the end)."""
    if len(text) <= width:
        return text
    keep = (width - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"


@dataclass
class PartitionResult:
    key: Any
    ops: int
    verdict: Verdict
    seconds: float
    linearization: list[Operation] | None = None
    failure: Failure | None = None
    reason: str = ""
    """Why the verdict is UNKNOWN: "timed out" or "memory limit reached"."""


@dataclass
class CheckResult:
    verdict: Verdict
    ops: int
    keys: int
    seconds: float
    partitions: list[PartitionResult] = field(default_factory=list)

    @property
    def failures(self) -> list[Failure]:
        return [p.failure for p in self.partitions if p.failure is not None]


class _GaveUp(Exception):
    """The search ran out of time or memory: the verdict is UNKNOWN, for this reason."""


class _Budget:
    """When the search must stop: a deadline, and a limit on the memory it may add.

    The memory is the process's resident size (/proc/self/statm), read at each of the
    search's periodic checks: the cache of configurations is what grows, and on a history
    too hard to decide it would otherwise fill the machine before the deadline."""

    def __init__(
        self, deadline: float, memory_mb: float | None, clock: Callable[[], float]
    ) -> None:
        self.deadline = deadline
        self.clock = clock
        self.memory_limit = None if memory_mb is None else _resident() + memory_mb * 2**20

    def check(self) -> None:
        if self.clock() > self.deadline:
            raise _GaveUp("timed out")
        if self.memory_limit is not None and _resident() > self.memory_limit:
            raise _GaveUp("memory limit reached")


def _resident() -> float:
    """Bytes resident now (Linux); 0 where that cannot be read, which disables the limit."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0.0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def check_operations(
    model: Model,
    ops: Sequence[Operation],
    timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    memory_mb: float | None = 1024,
) -> CheckResult:
    """Check a history against `model`, key by key, smallest first (a failure shows soon).

    ILLEGAL as soon as one key's history is not linearizable, whatever the others; UNKNOWN
    if the `timeout` (seconds, for all keys together) ran out, or the search grew the
    process by `memory_mb`, before every key was decided.
    """
    start = clock()
    budget = _Budget(math.inf if timeout is None else start + timeout, memory_mb, clock)
    groups = model.partition(ops)
    results: list[PartitionResult] = []
    for group in sorted(groups, key=len):
        key = group[0].key if group else None
        began = clock()
        if began >= budget.deadline:
            results.append(
                PartitionResult(key, len(group), Verdict.UNKNOWN, 0.0, reason="timed out")
            )
            continue
        try:
            order, failure = _search(model, group, budget)
        except _GaveUp as stop:
            seconds = clock() - began
            results.append(
                PartitionResult(key, len(group), Verdict.UNKNOWN, seconds, reason=str(stop))
            )
            continue
        verdict = Verdict.OK if failure is None else Verdict.ILLEGAL
        results.append(PartitionResult(key, len(group), verdict, clock() - began, order, failure))
    verdicts = {r.verdict for r in results}
    verdict = next((v for v in (Verdict.ILLEGAL, Verdict.UNKNOWN) if v in verdicts), Verdict.OK)
    results.sort(key=lambda r: (r.key is not None, str(r.key)))
    return CheckResult(verdict, len(ops), len(groups), clock() - start, results)


def _search(
    model: Model, ops: Sequence[Operation], budget: _Budget
) -> tuple[list[Operation] | None, Failure | None]:
    """Wing-Gong-Lowe over one sub-history: its linearization, or why there is none.

    The list of entries is int arrays (next, previous, and for a call the position of its
    return, 0 for a return); position 0 is the head. The hot loop allocates only the cache's
    (bitset, state) key and what the model's step returns.

    Operations of unknown outcome need not be placed at all (their return is at infinity,
    and a model accepts them in every state), which allows three reductions, each keeping
    the search complete:

    * it succeeds once every known operation is placed: the unknown ones left go last,
      where nothing observes them;
    * an unknown operation that would leave the state as it is is not placed: leaving it
      out is as good;
    * a known operation that the model says is read-only (a read: it leaves every state
      as it is) is placed as soon as it is legal, and no other move is tried from there:
      a linearization that places it later works with it placed now, as it changes
      nothing and only unblocks others;
    * of unknown operations with equal inputs, the one called first is placed first: they
      are interchangeable, and the earlier one can go wherever the later one can.

    The cache holds (known placed, unknown placed, state), the sets as int bitsets.
    """
    n = len(ops)
    entries = sorted(
        [(op.call, 0, i) for i, op in enumerate(ops)] + [(op.ret, 1, i) for i, op in enumerate(ops)]
    )  # calls before returns at equal times: closed intervals
    size = 2 * n + 1
    nxt = list(range(1, size + 1))
    nxt[-1] = -1
    prv = list(range(-1, size - 1))
    match = [0] * size
    opid = [-1] * size
    inp_at: list[Any] = [None] * size
    out_at: list[Any] = [None] * size
    bit_at = [0] * size  # known and unknown operations are numbered apart
    vague = [False] * size
    observer = [False] * size  # a known read-only operation
    read_only = model.read_only
    calls = [0] * n
    returns = [0] * n
    for pos, (_, kind, i) in enumerate(entries, start=1):
        opid[pos] = i
        (returns if kind else calls)[i] = pos
    twin = [0] * size  # an unknown operation's previous twin (same input), by call
    last_twin: dict[Any, int] = {}
    numbered = [0, 0]
    for pos in sorted(calls):
        op = ops[opid[pos]]
        match[pos] = returns[opid[pos]]
        inp_at[pos] = op.input
        out_at[pos] = op.output
        vague[pos] = unknown = op.output is UNKNOWN
        observer[pos] = not unknown and read_only(op.input, op.output)
        bit_at[pos] = 1 << numbered[unknown]
        numbered[unknown] += 1
        if unknown:
            twin[pos] = last_twin.get(op.input, 0)
            last_twin[op.input] = bit_at[pos]
    to_place = numbered[False]
    if not to_place:
        return list(ops), None

    step = model.step
    cache: set[tuple[int, int, Any]] = set()
    remember = cache.add
    stack: list[int] = []
    states: list[Any] = []
    push, pop = stack.append, stack.pop
    push_state, pop_state = states.append, states.pop
    forced = [False] * size  # placed as the only move worth trying from its configuration
    state = model.init()
    known = unknown_placed = 0  # bitsets of the operations placed, known and unknown
    entry = nxt[0]
    furthest = 0  # the latest return any search path stopped at
    furthest_stack: list[int] = []
    counter = 0
    while True:
        counter += 1
        if not counter & 0x3FFF:
            budget.check()
        ret = match[entry]
        if ret:  # a call: try to place its operation now
            if vague[entry] and twin[entry] and not twin[entry] & unknown_placed:
                entry = nxt[entry]  # its earlier twin goes first: the same, and never later
                continue
            legal, after = step(state, inp_at[entry], out_at[entry])
            if not legal:
                entry = nxt[entry]
                continue
            if vague[entry]:
                if after == state:
                    entry = nxt[entry]  # changes nothing: leaving it unplaced is as good
                    continue
                k, u = known, unknown_placed | bit_at[entry]
            else:
                k, u = known | bit_at[entry], unknown_placed
            still = observer[entry] and after == state
            seen = len(cache)
            remember((k, u, after))
            if len(cache) != seen:  # a configuration not reached before
                if not vague[entry]:
                    to_place -= 1
                    if not to_place:
                        push(entry)
                        return _completed(ops, stack, opid), None
                forced[entry] = still
                push(entry)
                push_state(state)
                state = after
                known, unknown_placed = k, u
                before, behind = prv[entry], nxt[entry]
                nxt[before] = behind
                prv[behind] = before
                before, behind = prv[ret], nxt[ret]
                nxt[before] = behind
                if behind != -1:
                    prv[behind] = before
                entry = nxt[0]
                continue
            if not still:
                entry = nxt[entry]
                continue
            # else: the one move worth trying from here failed before, so this fails too
        elif entry > furthest or (entry == furthest and len(stack) > len(furthest_stack)):
            furthest = entry  # a return whose operation is not placed: note it, and undo
            furthest_stack = stack[:]
        while True:  # undo the last placement, and the forced ones that led to it
            if not stack:
                return None, _failure(model, ops, entries, furthest, furthest_stack, opid)
            entry = pop()
            state = pop_state()
            if vague[entry]:
                unknown_placed ^= bit_at[entry]
            else:
                known ^= bit_at[entry]
                to_place += 1
            ret = match[entry]
            before, behind = prv[ret], nxt[ret]
            nxt[before] = ret
            if behind != -1:
                prv[behind] = ret
            before, behind = prv[entry], nxt[entry]
            nxt[before] = entry
            prv[behind] = entry
            if not forced[entry]:
                break
        entry = nxt[entry]


def _completed(ops: Sequence[Operation], stack: list[int], opid: list[int]) -> list[Operation]:
    """The linearization found: the placed operations, then the unknown ones left over."""
    placed = [ops[opid[pos]] for pos in stack]
    taken = {op.index for op in placed}
    return placed + [op for op in ops if op.index not in taken]


def _failure(
    model: Model,
    ops: Sequence[Operation],
    entries: list[tuple[float, int, int]],
    furthest: int,
    furthest_stack: list[int],
    opid: list[int],
) -> Failure:
    placed = [ops[opid[pos]] for pos in furthest_stack]
    placed_ids = {opid[pos] for pos in furthest_stack}
    called = [i for _, kind, i in entries[:furthest] if kind == 0]
    open_ops = [ops[i] for i in called if i not in placed_ids]
    stuck = ops[opid[furthest]]
    key = ops[0].key if ops else None
    return Failure(model, key, list(ops), furthest, stuck, placed, open_ops)


def check(model: Model, ops: Sequence[Operation], timeout: float | None = None) -> Verdict:
    """Just the verdict."""
    return check_operations(model, ops, timeout).verdict
