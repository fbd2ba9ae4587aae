"""Check a recorded history for linearizability.

    python -m tools.check_history --format jepsen-register etcd_000.log
    python -m tools.check_history --format edn-kv c10-bad.txt --timeout 10
    python -m tools.check_history --format ours history.jsonl --export-edn history.edn

Formats: ``jepsen-register`` (Jepsen's etcd logs: one register, read/write/cas),
``edn-kv`` (Jepsen EDN maps: get/put/append on many keys) and ``ours`` (the JSON lines
that tools/history.py's HistoryRecorder writes for our store). Each key is checked on its
own by tools/linearizability.py. Prints one summary line (ops, keys, verdict, seconds), and
on a failure the shortest failing prefix of the key and where the search got stuck.

Exit status: 0 linearizable, 1 not linearizable, 2 undecided within --timeout, or a file
that cannot be read, or bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/check_history.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.history import FORMATS, HistoryError, operations, read_history, to_edn
from tools.linearizability import (
    Model,
    Verdict,
    check_operations,
    kv_model,
    register_model,
    versioned_model,
)

EXIT = {Verdict.OK: 0, Verdict.ILLEGAL: 1, Verdict.UNKNOWN: 2}


def model_for(format: str, rewrites: bool = False) -> Model:
    """The model a format's operations are written for."""
    if format == "jepsen-register":
        return register_model
    if format == "edn-kv":
        return kv_model
    return versioned_model(rewrites)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="check_history", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("file", type=Path, help="the history to check")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the file's format")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to search before giving up with exit status 2 (default 60)",
    )
    parser.add_argument(
        "--max-memory",
        type=float,
        default=1024,
        metavar="MB",
        help="memory the search may add before giving up with exit status 2 (default 1024)",
    )
    parser.add_argument("--export-edn", type=Path, metavar="OUT", help="also write it as EDN")
    parser.add_argument(
        "--allow-rewrites",
        action="store_true",
        help="ours: a key's version may rise without a client's write (a re-stamped merge)",
    )
    parser.add_argument("--failures", type=int, default=3, help="failing keys to show (3)")
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error("--timeout must be above 0 seconds")
    if not args.max_memory > 0:
        parser.error("--max-memory must be above 0 MB")

    started = time.monotonic()
    try:
        history = read_history(args.file, args.format)
        ops = operations(history)
        if args.export_edn is not None:
            args.export_edn.write_text(to_edn(history), encoding="utf-8")
    except (OSError, HistoryError, UnicodeDecodeError) as error:
        print(f"check_history: cannot read {args.file} as {args.format}: {error}", file=sys.stderr)
        return 2
    model = model_for(args.format, args.allow_rewrites)
    result = check_operations(model, ops, args.timeout, memory_mb=args.max_memory)
    for failure in result.failures[: args.failures]:
        print(failure.report())
        print()
    if len(result.failures) > args.failures:
        print(f"... and {len(result.failures) - args.failures} more keys not linearizable\n")
    undecided = [p for p in result.partitions if p.verdict is Verdict.UNKNOWN]
    reasons = sorted({p.reason for p in undecided if p.reason})
    note = ""
    if undecided:
        note = f" ({len(undecided)} key(s) undecided: {', '.join(reasons)}"
        note += f"; --timeout {args.timeout:g} s, --max-memory {args.max_memory:g} MB)"
    keys = f"{result.keys} key" + ("" if result.keys == 1 else "s")
    print(
        f"{args.file.name}: {result.ops} ops, {keys}, {result.verdict.value}{note}, "
        f"{time.monotonic() - started:.2f} s"
    )
    return EXIT[result.verdict]


if __name__ == "__main__":
    sys.exit(main())
