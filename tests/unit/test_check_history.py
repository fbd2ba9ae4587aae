"""The linearizability checker (tools/check_history.py), proven before it judges our store.

First on histories it did not produce: every labelled history in shared/histories (Jepsen's
etcd logs, Porcupine's kv histories) must get its label. Then on small histories written by
hand for each model, where the reason for each verdict can be read off. Then against a
brute-force search on thousands of random small histories: the checker's shortcuts
(unknown operations at infinity, reads placed at once) must never change a verdict, and the
failing prefix it prints must be the shortest. Last, the command line's exit codes.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tools.edn import Keyword, edn, parse_edn
from tools.history import (
    UNKNOWN,
    History,
    HistoryError,
    HistoryRecorder,
    Operation,
    canonical,
    operations,
    read_edn_kv,
    read_history,
    read_jepsen_register,
    read_ours,
    to_edn,
)
from tools.linearizability import (
    Model,
    Verdict,
    check_operations,
    kv_model,
    register_model,
    versioned_model,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "histories"
"""CI's clone has a copy of shared/ beside it, as /work/shared is beside /work/main."""

LIMIT_S = 60.0


def labelled() -> list[tuple[str, str, bool]]:
    """(format, file, linearizable) for every labelled history; one "missing" entry when
    the folder is not there, so that the test fails instead of vanishing."""
    labels = SHARED / "jepsen-etcd" / "labels.txt"
    if not labels.is_file():
        return [("missing", str(labels), False)]
    cases = []
    for line in labels.read_text().splitlines():
        if line.strip():
            name, label = line.split()
            cases.append(("jepsen-register", f"jepsen-etcd/{name}", label == "true"))
    for path in sorted((SHARED / "kv").glob("*.txt")):
        cases.append(("edn-kv", f"kv/{path.name}", path.stem.endswith("-ok")))
    return cases


def test_the_labelled_histories_are_where_the_tests_look() -> None:
    logs = sorted((SHARED / "jepsen-etcd").glob("etcd_*.log"))
    kv = sorted((SHARED / "kv").glob("*.txt"))
    assert len(logs) >= 50 and len(kv) >= 4, (
        f"expected the labelled histories in {SHARED} (shared/histories beside the repo, "
        f"as /work/shared is beside /work/main): found {len(logs)} etcd logs, {len(kv)} kv files"
    )
    named = {
        line.split()[0]
        for line in (SHARED / "jepsen-etcd/labels.txt").read_text().split("\n")
        if line
    }
    assert named == {path.name for path in logs}, "labels.txt must label every log, and only them"
    assert {p.stem.rsplit("-", 1)[1] for p in kv} == {"ok", "bad"}


@pytest.mark.parametrize(("format", "name", "linearizable"), labelled(), ids=lambda v: str(v))
def test_every_labelled_history_gets_its_label(format: str, name: str, linearizable: bool) -> None:
    if format == "missing":
        pytest.fail(f"no labelled histories: looked for {name}")
    ops = operations(read_history(SHARED / name, format))
    model = register_model if format == "jepsen-register" else kv_model
    started = time.monotonic()
    result = check_operations(model, ops, timeout=LIMIT_S)
    seconds = time.monotonic() - started
    expected = Verdict.OK if linearizable else Verdict.ILLEGAL
    assert result.verdict is expected, f"{name}: {result.verdict.value} in {seconds:.2f} s"
    assert seconds < LIMIT_S
    if not linearizable:
        report = result.failures[0].report()
        assert "not linearizable" in report and "cannot place" in report


# -- hand-written histories: the register (Jepsen's etcd log format) -----------------------


def jepsen_log(tmp_path: Path, script: str) -> Path:
    """A Jepsen log from lines such as "0 invoke write 1" or "1 ok cas [1 2]"."""
    lines = []
    for row in script.strip().splitlines():
        process, kind, f, value = row.split(maxsplit=3)
        lines.append(f"INFO  jepsen.util - {process}\t:{kind}\t:{f}\t{value}")
    path = tmp_path / "history.log"
    path.write_text("INFO  jepsen.core - Run starting\n" + "\n".join(lines) + "\n")
    return path


def register_verdict(tmp_path: Path, script: str) -> Verdict:
    ops = operations(read_jepsen_register(jepsen_log(tmp_path, script)))
    return check_operations(register_model, ops).verdict


def test_a_read_sees_the_last_write(tmp_path: Path) -> None:
    script = "0 invoke write 1\n0 ok write 1\n1 invoke read nil\n1 ok read {}"
    assert register_verdict(tmp_path, script.format(1)) is Verdict.OK
    assert register_verdict(tmp_path, script.format("nil")) is Verdict.ILLEGAL
    assert register_verdict(tmp_path, "1 invoke read nil\n1 ok read nil") is Verdict.OK


def test_a_concurrent_read_may_see_either_value(tmp_path: Path) -> None:
    for seen in ("nil", "1"):
        script = f"0 invoke write 1\n1 invoke read nil\n1 ok read {seen}\n0 ok write 1"
        assert register_verdict(tmp_path, script) is Verdict.OK
    script = "0 invoke write 1\n1 invoke read nil\n1 ok read 2\n0 ok write 1"
    assert register_verdict(tmp_path, script) is Verdict.ILLEGAL


def test_a_failed_cas_says_the_register_held_something_else(tmp_path: Path) -> None:
    setup = "0 invoke write 1\n0 ok write 1\n"
    assert register_verdict(tmp_path, setup + "1 invoke cas [2 3]\n1 fail cas [2 3]") is Verdict.OK
    assert register_verdict(tmp_path, setup + "1 invoke cas [1 3]\n1 fail cas [1 3]") is (
        Verdict.ILLEGAL
    )
    done = setup + "1 invoke cas [1 3]\n1 ok cas [1 3]\n2 invoke read nil\n2 ok read 3"
    assert register_verdict(tmp_path, done) is Verdict.OK


def test_an_unknown_write_may_become_visible_any_time_later(tmp_path: Path) -> None:
    script = """
        0 invoke write 1
        0 ok write 1
        1 invoke write 2
        1 info write :timed-out
        2 invoke read nil
        2 ok read 1
        2 invoke read nil
        2 ok read 2
    """
    assert register_verdict(tmp_path, script) is Verdict.OK


def test_an_unknown_write_may_never_take_effect(tmp_path: Path) -> None:
    script = """
        0 invoke write 1
        0 ok write 1
        1 invoke write 2
        1 info write :timed-out
        2 invoke read nil
        2 ok read 1
    """
    assert register_verdict(tmp_path, script) is Verdict.OK
    open_at_the_end = (
        "0 invoke write 1\n0 ok write 1\n1 invoke write 2\n2 invoke read nil\n2 ok read 1"
    )
    assert register_verdict(tmp_path, open_at_the_end) is Verdict.OK


def test_an_unknown_write_takes_effect_once(tmp_path: Path) -> None:
    script = """
        0 invoke write 1
        0 ok write 1
        1 invoke write 2
        1 info write :timed-out
        2 invoke read nil
        2 ok read 2
        2 invoke read nil
        2 ok read 1
    """
    assert register_verdict(tmp_path, script) is Verdict.ILLEGAL


def test_a_stale_read_fails_and_the_report_shows_it(tmp_path: Path) -> None:
    script = """
        0 invoke write 1
        0 ok write 1
        0 invoke write 2
        0 ok write 2
        1 invoke read nil
        1 ok read 1
        0 invoke write 3
        0 ok write 3
    """
    ops = operations(read_jepsen_register(jepsen_log(tmp_path, script)))
    result = check_operations(register_model, ops)
    assert result.verdict is Verdict.ILLEGAL
    failure = result.failures[0]
    assert failure.stuck.input == ("read",) and failure.stuck.output == 1
    assert failure.prefix_events == 6  # the stale read's return: the write of 3 plays no part
    assert [op.input for op in failure.linearized] == [("write", 1), ("write", 2)]
    report = failure.report()
    assert "ends at line 7 with the return of #2" in report
    assert "write(2)  [lines 4-5]   => 2" in report
    assert "read() -> 1  [lines 6-7]" in report


def test_a_timed_out_read_is_dropped(tmp_path: Path) -> None:
    script = "0 invoke write 1\n0 ok write 1\n1 invoke read nil\n1 fail read :timed-out"
    ops = operations(read_jepsen_register(jepsen_log(tmp_path, script)))
    assert [op.input for op in ops] == [("write", 1)]


def test_log_lines_with_spaces_instead_of_tabs_are_read(tmp_path: Path) -> None:
    path = tmp_path / "spaces.log"
    lines = [
        "INFO  jepsen.util - 3   :invoke :cas    [1 4]",
        "INFO  jepsen.util - 3   :fail   :cas    [1 4]",
    ]
    path.write_text("\n".join(lines) + "\n")
    (op,) = operations(read_jepsen_register(path))
    assert (op.input, op.output) == (("cas", 1, 4), False)


# -- hand-written histories: many keys, get / put / append (EDN) ---------------------------


def edn_lines(tmp_path: Path, rows: Sequence[tuple[int, str, str, str, object]]) -> Path:
    path = tmp_path / "kv.txt"
    text = [
        f'{{:process {p}, :type :{kind}, :f :{f}, :key "{key}", :value {edn(value)}}}'
        for p, kind, f, key, value in rows
    ]
    path.write_text("\n".join(text) + "\n")
    return path


def kv_verdict(path: Path) -> Verdict:
    return check_operations(kv_model, operations(read_edn_kv(path))).verdict


def test_appends_on_independent_keys(tmp_path: Path) -> None:
    rows = [
        (0, "invoke", "append", "a", "x"),
        (1, "invoke", "append", "b", "y"),
        (0, "ok", "append", "a", "x"),
        (1, "ok", "append", "b", "y"),
        (0, "invoke", "append", "a", "z"),
        (0, "ok", "append", "a", "z"),
        (2, "invoke", "get", "a", None),
        (2, "ok", "get", "a", "xz"),
        (2, "invoke", "get", "b", None),
        (2, "ok", "get", "b", "y"),
    ]
    assert kv_verdict(edn_lines(tmp_path, rows)) is Verdict.OK
    rows[7] = (2, "ok", "get", "a", "zx")
    assert kv_verdict(edn_lines(tmp_path, rows)) is Verdict.ILLEGAL
    rows[7] = (2, "ok", "get", "a", "xz")
    rows[9] = (2, "ok", "get", "b", "")
    assert kv_verdict(edn_lines(tmp_path, rows)) is Verdict.ILLEGAL


def test_a_put_replaces_and_a_key_starts_empty(tmp_path: Path) -> None:
    rows = [
        (0, "invoke", "get", "k", None),
        (0, "ok", "get", "k", ""),
        (0, "invoke", "append", "k", "a"),
        (0, "ok", "append", "k", "a"),
        (0, "invoke", "put", "k", "b"),
        (0, "ok", "put", "k", "b"),
        (1, "invoke", "append", "k", "c"),
        (1, "info", "append", "k", "c"),
        (0, "invoke", "get", "k", None),
        (0, "ok", "get", "k", "bc"),
        (0, "invoke", "get", "k", None),
        (0, "fail", "get", "k", Keyword("timed-out")),
    ]
    path = edn_lines(tmp_path, rows)
    assert len(operations(read_edn_kv(path))) == 5  # the timed-out get is dropped
    assert kv_verdict(path) is Verdict.OK


# -- hand-written histories: our store's versioned keys -------------------------------------


class Ticks:
    """A clock for the recorder that moves one second per reading: order made explicit."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def recorder() -> HistoryRecorder:
    return HistoryRecorder(clock=Ticks())


def verdict_of(rec: HistoryRecorder, rewrites: bool = False) -> Verdict:
    return check_operations(versioned_model(rewrites), operations(rec.history())).verdict


def write(rec: HistoryRecorder, key: str, value: object, version: int, **kw: object) -> None:
    rec.ok(rec.invoke(0, "write", key, value, **kw), version=version)  # type: ignore[arg-type]


def read(rec: HistoryRecorder, key: str, value: object = None, version: int | None = None) -> None:
    op = rec.invoke(1, "read", key)
    if version is None:
        rec.ok(op, status=404)
    else:
        rec.ok(op, value=value, version=version)


def test_ours_reads_see_the_last_write_with_its_version() -> None:
    rec = recorder()
    read(rec, "k")
    write(rec, "k", {"n": 1}, 3)
    read(rec, "k", {"n": 1}, 3)
    write(rec, "j", "other key", 4)
    assert verdict_of(rec) is Verdict.OK
    read(rec, "k", {"n": 1}, 4)  # the right value under another write's version
    assert verdict_of(rec) is Verdict.ILLEGAL


def test_ours_versions_increase_in_linearization_order() -> None:
    rec = recorder()
    write(rec, "k", "a", 5)
    write(rec, "k", "b", 3)
    assert verdict_of(rec) is Verdict.ILLEGAL
    rec = recorder()
    first = rec.invoke(0, "write", "k", "a")
    second = rec.invoke(1, "write", "k", "b")
    rec.ok(first, version=5)
    rec.ok(second, version=3)  # concurrent: b went first
    read(rec, "k", "a", 5)
    assert verdict_of(rec) is Verdict.OK


def test_ours_a_stale_read_fails() -> None:
    rec = recorder()
    write(rec, "k", "a", 1)
    write(rec, "k", "b", 2)
    read(rec, "k", "a", 1)
    assert verdict_of(rec) is Verdict.ILLEGAL


def test_ours_deletes_and_404s() -> None:
    rec = recorder()
    write(rec, "k", "a", 1)
    rec.ok(rec.invoke(0, "delete", "k"), version=2)
    read(rec, "k")
    rec.ok(rec.invoke(0, "delete", "k"), status=404)  # nothing left to delete
    write(rec, "k", "b", 3, if_version=0)  # a deleted key is absent
    read(rec, "k", "b", 3)
    assert verdict_of(rec) is Verdict.OK
    read(rec, "k")
    assert verdict_of(rec) is Verdict.ILLEGAL
    rec = recorder()
    rec.fail(rec.invoke(0, "delete", "k"), status=404)
    write(rec, "k", "a", 1)
    rec.ok(rec.invoke(0, "delete", "k"), status=404)  # but it is there
    assert verdict_of(rec) is Verdict.ILLEGAL


def test_ours_conditional_writes_and_412() -> None:
    rec = recorder()
    write(rec, "k", "a", 1)
    rec.fail(rec.invoke(0, "write", "k", "b", if_version=0), status=412, current_version=1)
    rec.fail(rec.invoke(0, "write", "k", "b", if_version=7), status=412, current_version=1)
    write(rec, "k", "c", 2, if_version=1)
    rec.fail(rec.invoke(0, "delete", "k", if_version=1), status=412, current_version=2)
    rec.ok(rec.invoke(0, "delete", "k", if_version="*"), version=3)
    rec.fail(rec.invoke(0, "write", "k", "d", if_version="*"), status=412, current_version=0)
    assert verdict_of(rec) is Verdict.OK
    for expected, current in ((0, 0), (3, 3), (3, None)):  # absent; a match refused twice
        bad = recorder()
        write(bad, "k", "a", 3)
        op = bad.invoke(0, "write", "k", "b", if_version=expected)
        bad.fail(op, status=412, current_version=current)
        assert verdict_of(bad) is Verdict.ILLEGAL, (expected, current)
    bad = recorder()
    write(bad, "k", "a", 3)
    write(bad, "k", "b", 4, if_version=2)  # went ahead at the wrong version
    assert verdict_of(bad) is Verdict.ILLEGAL


def test_ours_an_unknown_write_may_show_up_later_with_its_version() -> None:
    rec = recorder()
    write(rec, "k", "a", 1)
    rec.info(rec.invoke(0, "write", "k", "b"), error="timed out")
    read(rec, "k", "a", 1)
    read(rec, "k", "b", 9)  # its version learnt only now
    write(rec, "k", "c", 10, if_version=9)
    assert verdict_of(rec) is Verdict.OK
    rec = recorder()
    write(rec, "k", "a", 5)
    rec.info(rec.invoke(0, "write", "k", "b"))
    read(rec, "k", "b", 4)  # an unknown write still got a version above the last one
    assert verdict_of(rec) is Verdict.ILLEGAL


def test_ours_an_unknown_write_may_never_show_up() -> None:
    rec = recorder()
    write(rec, "k", "a", 1)
    rec.invoke(0, "write", "k", "b")  # still open at the end
    rec.info(rec.invoke(2, "delete", "k"))
    read(rec, "k", "a", 1)
    assert verdict_of(rec) is Verdict.OK
    assert rec.open_ops == [1]


def test_ours_a_conditional_unknown_write_against_an_unknown_version() -> None:
    """Whether it went ahead depends on a version nobody saw: both must stay possible."""
    for seen in (("x", 12), ("b", 11)):
        rec = recorder()
        write(rec, "k", "a", 1)
        rec.info(rec.invoke(0, "write", "k", "b"))
        rec.info(rec.invoke(1, "write", "k", "x", if_version=11))
        read(rec, "k", *seen)
        assert verdict_of(rec) is Verdict.OK, seen
    rec = recorder()
    write(rec, "k", "a", 1)
    rec.info(rec.invoke(0, "write", "k", "b"))
    rec.info(rec.invoke(1, "write", "k", "x", if_version=11))
    read(rec, "k", "x", 12)
    read(rec, "k", "b", 11)  # the write of x saw b at 11, so b cannot come back
    assert verdict_of(rec) is Verdict.ILLEGAL


def test_ours_rewrites_raise_a_version_only_when_allowed() -> None:
    rec = recorder()
    write(rec, "k", "a", 1)
    read(rec, "k", "a", 1_000_000_004)  # re-stamped by a leader that merged it
    write(rec, "k", "b", 1_000_000_005, if_version=1_000_000_004)
    assert verdict_of(rec) is Verdict.ILLEGAL
    assert verdict_of(rec, rewrites=True) is Verdict.OK
    read(rec, "k", "a", 1_000_000_004)
    assert verdict_of(rec, rewrites=True) is Verdict.ILLEGAL


def test_ours_a_retried_write_is_one_operation(tmp_path: Path) -> None:
    rec = recorder()
    op = rec.invoke(3, "write", "k", [1, 2], idempotency_key="req-1")
    rec.retry(op)
    rec.retry(op)
    rec.ok(op, version=7, node="http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="already complete"):
        rec.ok(op, version=7)
    with pytest.raises(ValueError, match="already complete"):
        rec.retry(op)
    with pytest.raises(ValueError, match="never invoked"):
        rec.info(99)
    path = tmp_path / "h.jsonl"
    rec.write_jsonl(path)
    header, invoke, ok = (json.loads(line) for line in path.read_text().splitlines())
    assert header == {"history": "replicated-kv", "format_version": 1}
    assert invoke == {
        "type": "invoke",
        "op": 0,
        "process": 3,
        "f": "write",
        "key": "k",
        "value": [1, 2],
        "idempotency_key": "req-1",
        "time": 1.0,
    }
    assert ok == {
        "type": "ok",
        "op": 0,
        "process": 3,
        "f": "write",
        "key": "k",
        "status": 200,
        "version": 7,
        "node": "http://127.0.0.1:8000",
        "attempts": 3,
        "time": 2.0,
    }
    (operation,) = operations(read_ours(path))
    assert (operation.input, operation.output) == (("write", "[1,2]", None), ("ok", 7))


def test_ours_the_recorder_refuses_what_the_checker_could_not_read() -> None:
    rec = recorder()
    with pytest.raises(ValueError, match="f must be"):
        rec.invoke(0, "cas", "k")
    with pytest.raises(ValueError, match="if_version"):
        rec.invoke(0, "write", "k", 1, if_version=-1)
    with pytest.raises(ValueError, match="needs its version"):
        rec.ok(rec.invoke(0, "write", "k", 1))
    with pytest.raises(ValueError, match="cannot find its key absent"):
        rec.ok(rec.invoke(0, "write", "k", 1), status=404)
    with pytest.raises(TypeError):
        rec.invoke(0, "write", "k", object())


def test_ours_a_fail_that_observed_nothing_is_dropped() -> None:
    rec = recorder()
    rec.fail(rec.invoke(0, "write", "k", "a"), status=503, error="the leader is starting")
    rec.fail(rec.invoke(0, "read", "k"), status=503)
    rec.info(rec.invoke(0, "read", "k"))
    assert operations(rec.history()) == []


def test_ours_the_recorder_is_shared_by_threads_and_tasks() -> None:
    rec = HistoryRecorder()

    def client(process: int) -> None:
        for n in range(200):
            op = rec.invoke(process, "write", f"k{process}", n)
            rec.ok(op, version=process * 1000 + n + 1)

    threads = [threading.Thread(target=client, args=(p,)) for p in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def reader(process: int) -> None:
        for _ in range(50):
            op = rec.invoke(process, "read", "k0")
            await asyncio.sleep(0)
            rec.ok(op, value=199, version=200)

    async def readers() -> None:
        await asyncio.gather(*(reader(p) for p in range(10, 14)))

    asyncio.run(readers())
    ops = operations(rec.history())
    assert len(ops) == 4 * 200 + 4 * 50
    invoked = [e.op for e in rec.history().events if e.type == "invoke"]
    assert sorted(op for op in invoked if op is not None) == list(range(1000))
    assert check_operations(versioned_model(), ops).verdict is Verdict.OK


def test_ours_reader_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = '{"type": "invoke", "op": 0, "process": 0, "f": "read", "key": "k", "time": 1}'
    for bad, message in (
        ('{"type": "ok", "op": 5, "time": 2}', "op 5 completes but was never invoked"),
        ('{"type": "invoke", "op": 0, "process": 0, "f": "read", "key": "k", "time": 2}', "twice"),
        ("not json", "not JSON"),
        ('{"type": "ok", "op": 0, "status": 200, "value": 1, "time": 2}', "needs its version"),
    ):
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(HistoryError, match=message) as raised:
            operations(read_ours(path))
        assert ":2:" in str(raised.value)


# -- EDN export ---------------------------------------------------------------------------


def test_edn_values_round_trip() -> None:
    value = {Keyword("a"): [1, -2.5, 'q"uote\n', None, True], "s": Keyword("timed-out")}
    assert parse_edn(edn(value)) == {
        Keyword("a"): [1, -2.5, 'q"uote\n', None, True],
        "s": Keyword("timed-out"),
    }
    assert parse_edn("{:process 0, :type :ok, :value [1 4]} ; a comment") == {
        Keyword("process"): 0,
        Keyword("type"): Keyword("ok"),
        Keyword("value"): [1, 4],
    }
    with pytest.raises(ValueError):
        parse_edn("{:a 1")


def test_an_exported_kv_history_reads_back_the_same(tmp_path: Path) -> None:
    if not (SHARED / "kv").is_dir():
        pytest.fail(f"no labelled histories: looked for {SHARED / 'kv'}")
    for name in ("c10-ok.txt", "c10-bad.txt"):
        history = read_edn_kv(SHARED / "kv" / name)
        out = tmp_path / name
        out.write_text(to_edn(history))
        again = read_edn_kv(out)
        assert [(e.type, e.process, e.f, e.key, e.value) for e in again.events] == [
            (e.type, e.process, e.f, e.key, e.value) for e in history.events
        ]
        expected = check_operations(kv_model, operations(history)).verdict
        assert check_operations(kv_model, operations(again)).verdict is expected


def test_an_exported_ours_history_gives_unknown_processes_new_numbers() -> None:
    rec = recorder()
    rec.info(rec.invoke(0, "write", "k", "a"), error="timed out")
    write(rec, "k", "b", 2, if_version=1)  # process 0 again, as Jepsen would not allow
    maps = [parse_edn(line) for line in to_edn(rec.history()).splitlines()]
    processes = [m[Keyword("process")] for m in maps]
    assert processes == [0, 0, 1, 1]
    assert maps[2][Keyword("if-version")] == 1 and maps[3][Keyword("version")] == 2
    assert [m[Keyword("time")] for m in maps] == [0, 1_000_000_000, 2_000_000_000, 3_000_000_000]
    register = History(
        "jepsen-register", read_jepsen_register(SHARED / "jepsen-etcd" / "etcd_000.log").events
    )
    first, second = (parse_edn(line) for line in to_edn(register).splitlines()[:2])
    assert Keyword("key") not in first and first[Keyword("f")] == Keyword("read")
    assert (first[Keyword("time")], second[Keyword("time")]) == (0, 1)  # the line order


# -- against a brute-force search -----------------------------------------------------------


def brute_force(model: Model, ops: list[Operation], required: set[int], allowed: set[int]) -> bool:
    """Whether the `required` operations can all be placed, in an order respecting real time,
    using any of the `allowed` ones too: every order tried, no shortcut."""

    def place(placed: set[int], state: object) -> bool:
        if required <= placed:
            return True
        for o in allowed - placed:
            if any(p in required and p not in placed and ops[p].ret < ops[o].call for p in allowed):
                continue
            legal, after = model.step(state, ops[o].input, ops[o].output)
            if legal and place(placed | {o}, after):
                return True
        return False

    return place(set(), model.init())


def random_history(rng: random.Random, kind: str) -> tuple[Model, list[Operation]]:
    """A history that a real object produced (each operation taking effect at a random
    instant within its interval, some of unknown outcome), then sometimes one output spoilt."""
    n = rng.randint(1, 7)
    spans = []
    for _ in range(n):
        call = float(rng.randint(0, 12))
        spans.append((call, call + rng.randint(0, 6)))
    moments = sorted(range(n), key=lambda i: rng.uniform(*spans[i]))
    unknown = [rng.random() < 0.3 for _ in range(n)]
    took_effect = [not u or rng.random() < 0.5 for u in unknown]
    inputs: list[tuple] = [()] * n
    outputs: list[object] = [None] * n
    if kind == "register":
        model, state = register_model, None
        for i in range(n):
            f = rng.choice(["read", "write", "cas"])
            inputs[i] = {"read": ("read",), "write": ("write", rng.randint(0, 2))}.get(
                f, ("cas", rng.randint(0, 2), rng.randint(0, 2))
            )
        for i in moments:
            inp = inputs[i]
            if inp[0] == "read":
                outputs[i] = state
            elif inp[0] == "write":
                state = inp[1] if took_effect[i] else state
            else:
                outputs[i] = state == inp[1]
                state = inp[2] if state == inp[1] and took_effect[i] else state
    elif kind == "kv":
        model, value = kv_model, ""
        for i in range(n):
            f = rng.choice(["get", "put", "append"])
            inputs[i] = ("get",) if f == "get" else (f, rng.choice("ab"))
        for i in moments:
            inp = inputs[i]
            if inp[0] == "get":
                outputs[i] = value
            elif took_effect[i]:
                value = inp[1] if inp[0] == "put" else value + inp[1]
    else:
        model, key = versioned_model(), (False, None, 0)
        counter = 0
        for i in range(n):
            f = rng.choice(["write", "write", "delete", "read", "read"])
            cond = rng.choice([None, None, 0, "*", 1, 2, 3]) if f != "read" else None
            inputs[i] = {
                "write": ("write", canonical(rng.choice("xy")), cond),
                "delete": ("delete", cond),
            }.get(f, ("read",))
        for i in moments:
            inp = inputs[i]
            present, held, version = key
            if inp[0] == "read":
                outputs[i] = ("value", held, version) if present else ("absent",)
                continue
            cond = inp[-1]
            live = version if present else 0
            if cond is not None and (not present if cond == "*" else live != cond):
                outputs[i] = ("mismatch", live)
            elif inp[0] == "delete" and not present:
                outputs[i] = ("absent",)
            elif took_effect[i]:
                counter += rng.randint(1, 2)
                key = (True, inp[1], counter) if inp[0] == "write" else (False, None, counter)
                outputs[i] = ("ok", counter)
            else:
                outputs[i] = ("ok", 0)  # spoilt below: it is of unknown outcome
    for i in range(n):
        if unknown[i] and inputs[i][0] not in ("read", "get"):
            outputs[i] = UNKNOWN
    if rng.random() < 0.5:
        i = rng.randrange(n)
        out = outputs[i]
        if isinstance(out, bool):
            outputs[i] = not out
        elif inputs[i][0] in ("read", "get") and kind != "versioned":
            outputs[i] = rng.choice(
                [None, 0, 1, 2] if kind == "register" else ["", "a", "ab", "ba"]
            )
        elif isinstance(out, tuple) and out[0] in ("value", "ok", "mismatch"):
            outputs[i] = (*out[:-1], max(0, (out[-1] or 0) + rng.choice([-2, -1, 1])))
        elif out == ("absent",) and inputs[i][0] == "read":
            outputs[i] = ("value", canonical(rng.choice("xy")), rng.randint(1, 4))
    ops = [
        Operation(
            i,
            i,
            "k",
            inputs[i],
            outputs[i],
            spans[i][0],
            math.inf if outputs[i] is UNKNOWN else spans[i][1],
        )
        for i in range(n)
    ]
    return model, ops


@pytest.mark.parametrize("kind", ["register", "kv", "versioned"])
def test_the_search_agrees_with_brute_force(kind: str) -> None:
    rng = random.Random(f"agree-{kind}")
    verdicts = {True: 0, False: 0}
    for _ in range(1000):
        model, ops = random_history(rng, kind)
        everything = set(range(len(ops)))
        expected = brute_force(model, ops, {o.index for o in ops if not o.unknown}, everything)
        assert (check_operations(model, ops).verdict is Verdict.OK) is expected, ops
        verdicts[expected] += 1
    assert min(verdicts.values()) >= 100, verdicts  # both kinds of history were tried


def placeable(model: Model, ops: list[Operation], prefix: list[tuple[float, int, int]]) -> bool:
    """Whether the operations completed in `prefix` (calls 0, returns 1) can be placed."""
    done = {i for _, kind, i in prefix if kind == 1}
    return brute_force(model, ops, done, {i for _, kind, i in prefix if kind == 0})


@pytest.mark.parametrize("kind", ["register", "kv", "versioned"])
def test_the_failing_prefix_printed_is_the_shortest(kind: str) -> None:
    """Up to the return it names, the completed operations cannot be placed (the ones
    still open may help); up to the return before it, they can."""
    rng = random.Random(f"prefix-{kind}")
    checked = 0
    while checked < 60:
        model, ops = random_history(rng, kind)
        result = check_operations(model, ops)
        if result.verdict is not Verdict.ILLEGAL:
            continue
        failure = result.failures[0]
        events = sorted([(o.call, 0, o.index) for o in ops] + [(o.ret, 1, o.index) for o in ops])
        assert events[failure.prefix_events - 1] == (failure.stuck.ret, 1, failure.stuck.index)

        assert not placeable(model, ops, events[: failure.prefix_events])
        earlier = [j for j in range(failure.prefix_events - 1) if events[j][1] == 1]
        assert not earlier or placeable(model, ops, events[: earlier[-1] + 1])
        checked += 1


# -- the command line ---------------------------------------------------------------------


def cli(*args: str | Path, module: bool = True) -> subprocess.CompletedProcess[str]:
    head = ["-m", "tools.check_history"] if module else [str(REPO / "tools" / "check_history.py")]
    return subprocess.run(
        [sys.executable, *head, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def hard_history(path: Path) -> Path:
    """Fifty clients appending to one key with long overlapping calls: far too many orders
    to rule out in a fraction of a second, whatever the verdict."""
    rng = random.Random(7)
    clock = [0.0] * 50
    events = []
    for n in range(1500):
        client = rng.randrange(50)
        start = clock[client] + rng.expovariate(1.0)
        clock[client] = end = start + rng.expovariate(1 / 30)
        events.append((start, client, "invoke", f"x{n}"))
        events.append((end, client, "ok", f"x{n}"))
    events.sort()
    path.write_text(
        "".join(
            f'{{:process {c}, :type :{t}, :f :append, :key "k", :value "{v}", '
            f":time {round(s * 1e6)}}}\n"
            for s, c, t, v in events
        )
        + '{:process 99, :type :invoke, :f :get, :key "k", :value nil, :time 999999999999}\n'
        '{:process 99, :type :ok, :f :get, :key "k", :value "nope", :time 999999999999}\n'
    )
    return path


def test_the_cli_exit_codes(tmp_path: Path) -> None:
    etcd = SHARED / "jepsen-etcd"
    ok = cli("--format", "jepsen-register", etcd / "etcd_002.log")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (
        ok.stdout.strip().splitlines()[-1].startswith("etcd_002.log: 77 ops, 1 key, linearizable, ")
    )

    bad = cli("--format", "jepsen-register", etcd / "etcd_000.log", module=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "The shortest failing prefix ends at line 86" in bad.stdout
    assert "85 ops, 1 key, not linearizable" in bad.stdout

    undecided = cli("--format", "edn-kv", hard_history(tmp_path / "hard.edn"), "--timeout", "0.3")
    assert undecided.returncode == 2, undecided.stdout + undecided.stderr
    assert "1 key, unknown (1 key(s) undecided: timed out; --timeout 0.3 s" in undecided.stdout

    missing = cli("--format", "ours", tmp_path / "nowhere.jsonl")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    unreadable = cli("--format", "ours", garbage)
    assert unreadable.returncode == 2 and "garbage.jsonl:1: not JSON" in unreadable.stderr
    assert cli("--format", "nonsense", garbage).returncode == 2
    assert cli("--format", "ours", garbage, "--timeout", "0").returncode == 2


def test_the_cli_checks_ours_and_exports_edn(tmp_path: Path) -> None:
    rec = recorder()
    write(rec, "k", "a", 1)
    read(rec, "k", "a", 1)
    path, edn_out = tmp_path / "h.jsonl", tmp_path / "h.edn"
    rec.write_jsonl(path)
    done = cli("--format", "ours", path, "--export-edn", edn_out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "h.jsonl: 2 ops, 1 key, linearizable" in done.stdout
    assert len(read_edn_kv(edn_out).events) == 4
    read(rec, "k", "a", 2)
    rec.write_jsonl(path)
    failed = cli("--format", "ours", path)
    assert failed.returncode == 1 and 'read() -> "a" @ version 2' in failed.stdout
