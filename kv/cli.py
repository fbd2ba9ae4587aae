"""kvctl: the store from the shell, on :mod:`kv.client` (Click for commands, rich for output).

    kvctl put colour '"blue"'          kvctl get colour --min-version 7
    kvctl ls --prefix user/            kvctl watch --prefix user/ --since 0
    kvctl status                       kvctl load users.jsonl

Installed as a console script (`pip install -e .`), and runnable as ``python -m kv``.
Exit codes say what happened, so scripts need not parse output: see EXIT_CODES.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kv.client import (
    AsyncKVClient,
    KeyNotFound,
    KVClient,
    KVError,
    NotReady,
    QuorumNotReached,
    Unreachable,
    VersionConflict,
    endpoints_from_env,
)
from kv.web.schemas import HealthResponse

OK, NOT_FOUND, USAGE, QUORUM_NOT_REACHED, CONFLICT, UNREACHABLE, REFUSED = range(7)
EXIT_CODES = {
    OK: "ok",
    NOT_FOUND: "not found (the key is absent or deleted)",
    USAGE: "usage: a bad command, option or input file",
    QUORUM_NOT_REACHED: "quorum not reached (the write is on the leader, not yet confirmed)",
    CONFLICT: "conflict (--if-version did not match; nothing was written)",
    UNREACHABLE: "unreachable: no node answered, or none was ready, before the deadline",
    REFUSED: "any other refusal by the server (401/403 a missing or limited token, "
    "422 invalid input)",
}
EXIT_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code}  {what}" for code, what in EXIT_CODES.items()
)


def exit_code(error: KVError) -> int:
    """The exit code for a client error (see EXIT_CODES)."""
    if isinstance(error, KeyNotFound):
        return NOT_FOUND
    if isinstance(error, QuorumNotReached):
        return QUORUM_NOT_REACHED
    if isinstance(error, VersionConflict):
        return CONFLICT
    if isinstance(error, Unreachable | NotReady):
        return UNREACHABLE
    return REFUSED


@dataclass
class Context:
    endpoints: list[str]
    output: str
    deadline: float
    out: Console
    err: Console

    token: str | None = None
    ca_file: str | None = None

    def client(self) -> KVClient:
        return KVClient(
            self.endpoints, deadline=self.deadline, token=self.token, ca_file=self.ca_file
        )

    def async_client(self) -> AsyncKVClient:
        return AsyncKVClient(
            self.endpoints, deadline=self.deadline, token=self.token, ca_file=self.ca_file
        )

    def fail(self, error: KVError) -> NoReturn:
        self.err.print(f"[red]error:[/red] {error.reason}", highlight=False, markup=True)
        sys.exit(exit_code(error))

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn a client error into its message on stderr and its exit code."""
        try:
            yield
        except KVError as error:
            self.fail(error)

    def show(self, model: BaseModel, fields: list[str]) -> None:
        """One result: its JSON (all fields), or a two-column table of `fields`."""
        if self.output == "json":
            click.echo(model.model_dump_json(indent=2))
            return
        table = Table(show_header=False, box=None)
        for name in fields:
            value = getattr(model, name)
            table.add_row(name, json.dumps(value) if name == "value" else str(value))
        self.out.print(table)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def parse_value(text: str, as_string: bool) -> Any:
    """VALUE is JSON when it parses as JSON (42, true, {"a": 1}, "quoted"), else the text
    itself, so `kvctl put colour blue` stores the string "blue"."""
    if as_string:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def endpoints_option(value: str | None) -> list[str]:
    if value is None:
        return endpoints_from_env()
    endpoints = [e.strip().rstrip("/") for e in value.split(",") if e.strip()]
    if not endpoints:
        raise click.BadParameter("name at least one node URL", param_hint="--endpoints")
    return endpoints


@click.group(epilog=EXIT_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--endpoints",
    envvar="KV_ENDPOINTS",
    metavar="URLS",
    help="Comma-separated node URLs (env KV_ENDPOINTS; default http://127.0.0.1:8000). "
    "Writes find the leader among them.",
)
@click.option(
    "--output",
    "-o",
    type=click.Choice(["table", "json"]),
    default="table",
    envvar="KV_OUTPUT",
    show_default=True,
    help="How to print results (env KV_OUTPUT).",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds each command may take, retries included.",
)
@click.option(
    "--token",
    envvar="KV_TOKEN",
    metavar="TOKEN",
    help="Bearer token, when the nodes have AUTH_FILE (env KV_TOKEN; prefer the variable: "
    "a command line is visible to other users).",
)
@click.option(
    "--cacert",
    envvar="KV_CACERT",
    type=click.Path(exists=True, dir_okay=False),
    help="The cluster's CA (certs/ca.pem), for https:// nodes (env KV_CACERT).",
)
@click.version_option(package_name="replicated-kv", prog_name="kvctl")
@click.pass_context
def cli(
    ctx: click.Context,
    endpoints: str | None,
    output: str,
    deadline: float,
    token: str | None,
    cacert: str | None,
) -> None:
    """kvctl: read, write and watch the replicated key-value store."""
    ctx.obj = Context(
        endpoints_option(endpoints),
        output,
        deadline,
        Console(soft_wrap=True),
        Console(stderr=True, soft_wrap=True),
        token or None,
        cacert,
    )


pass_context = click.make_pass_decorator(Context)
W_OPTION = click.option(
    "--w", type=click.IntRange(min=0), help="Followers that must confirm (default WRITE_QUORUM)."
)
IF_VERSION_OPTION = click.option(
    "--if-version",
    type=click.IntRange(min=0),
    help="Only if the key is at this version now (0: only if absent); else exit 4.",
)
WRITE_FIELDS = ["key", "value", "version", "deleted", "term", "acks", "write_quorum", "latency_ms"]


@cli.command()
@click.argument("key")
@click.argument("value")
@W_OPTION
@IF_VERSION_OPTION
@click.option("--string", "as_string", is_flag=True, help="Store VALUE as a string, never JSON.")
@pass_context
def put(
    obj: Context, key: str, value: str, w: int | None, if_version: int | None, as_string: bool
) -> None:
    """Write KEY. VALUE is JSON if it parses as JSON (42, true, '{"a": 1}'), else a string."""
    with obj.errors(), obj.client() as kv:
        written = kv.put(key, parse_value(value, as_string), w=w, if_version=if_version)
    obj.show(written, WRITE_FIELDS)


@cli.command()
@click.argument("key")
@click.option(
    "--min-version", type=click.IntRange(min=0), help="Wait until the node has applied it."
)
@click.option("--node", metavar="URL", help="Read from this node (default: any endpoint).")
@pass_context
def get(obj: Context, key: str, min_version: int | None, node: str | None) -> None:
    """Read KEY from any node (or --node); exit 1 if it does not exist."""
    with obj.errors(), obj.client() as kv:
        read = kv.get(key, min_version=min_version, node=node and node.rstrip("/"), wait_ms=1000)
    obj.show(read, ["key", "value", "version"])


@cli.command("del")
@click.argument("key")
@W_OPTION
@IF_VERSION_OPTION
@pass_context
def delete(obj: Context, key: str, w: int | None, if_version: int | None) -> None:
    """Delete KEY (a replicated tombstone); exit 1 if it does not exist."""
    with obj.errors(), obj.client() as kv:
        written = kv.delete(key, w=w, if_version=if_version)
    obj.show(written, WRITE_FIELDS)


@cli.command("ls")
@click.option("--prefix", default="", help="Only keys that start with this.")
@pass_context
def list_keys(obj: Context, prefix: str) -> None:
    """List the live keys, sorted."""
    with obj.errors(), obj.client() as kv:
        keys = kv.list(prefix=prefix)
    if obj.output == "json":
        print_json({"keys": keys, "count": len(keys)})
    else:
        for key in keys:
            click.echo(key)


@cli.command()
@click.option("--prefix", help="Only keys that start with this.")
@click.option(
    "--since", type=click.IntRange(min=0), help="Replay every change after this version first."
)
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many changes.")
@pass_context
def watch(obj: Context, prefix: str | None, since: int | None, count: int | None) -> None:
    """Print every change as it happens, resuming on another node if its node goes away."""
    seen = 0
    with obj.errors(), obj.client() as kv:
        for entry in kv.watch(since_version=since, prefix=prefix):
            if obj.output == "json":  # one object per line (JSON Lines), for pipes
                click.echo(entry.model_dump_json(exclude_none=True))
            else:
                what = "deleted" if entry.deleted else json.dumps(entry.value)
                click.echo(f"{entry.version}\t{entry.key}\t{what}")
            seen += 1
            if count is not None and seen >= count:
                return


@dataclass
class NodeRow:
    url: str
    health: HealthResponse | None
    error: str | None = None


def gather_status(
    endpoints: list[str], deadline: float, token: str | None = None, ca_file: str | None = None
) -> list[NodeRow]:
    """Every endpoint's /health, plus each follower a leader names that was not listed."""

    async def run() -> list[NodeRow]:
        async with AsyncKVClient(
            endpoints, deadline=deadline, timeout=deadline, token=token, ca_file=ca_file
        ) as kv:

            async def one(url: str) -> NodeRow:
                try:
                    return NodeRow(url, await kv.status(url))
                except KVError as error:
                    return NodeRow(url, None, error.reason)

            rows = list(await asyncio.gather(*(one(url) for url in endpoints)))
            known = set(endpoints)
            named = [
                replica.url.rstrip("/")
                for row in rows
                if row.health is not None
                for replica in row.health.replicas or []
            ]
            extra = [url for url in dict.fromkeys(named) if url not in known]
            return rows + list(await asyncio.gather(*(one(url) for url in extra)))

    return asyncio.run(run())


@cli.command()
@pass_context
def status(obj: Context) -> None:
    """A table of every node: role, term, last version, lag, state and leader. Followers
    that a leader names are added to the endpoints given. Exit 5 if no node answers."""
    rows = gather_status(obj.endpoints, min(obj.deadline, 3.0), obj.token, obj.ca_file)
    healthy = [row.health for row in rows if row.health is not None]
    if not healthy:
        obj.fail(Unreachable("no node answered: " + "; ".join(str(r.error) for r in rows)))
    newest = max(h.last_version for h in healthy)
    states = {
        replica.url.rstrip("/"): replica.state
        for h in healthy
        for replica in h.replicas or []
        if h.role == "leader"
    }
    records: list[dict[str, Any]] = []
    for row in rows:
        h = row.health
        if h is None:
            records.append({"node": row.url, "state": "unreachable", "error": row.error})
            continue
        state = "leading" if h.role == "leader" else states.get(row.url, "up")
        records.append(
            {
                "node": row.url,
                "role": h.role,
                "term": h.term,
                "last_version": h.last_version,
                "lag": newest - h.last_version,
                "state": state,
                "leader": h.leader_name
                or h.leader_url
                or ("(itself)" if state == "leading" else None),
            }
        )
    if obj.output == "json":
        print_json({"nodes": records})
        return
    columns = ["node", "role", "term", "last_version", "lag", "state", "leader"]
    table = Table()
    for name in columns:  # URLs wrap rather than end in an ellipsis on a narrow terminal
        table.add_column(name.replace("_", " "), overflow="fold")
    for r in records:
        table.add_row(*("-" if r.get(name) is None else str(r[name]) for name in columns))
    obj.out.print(table)


@dataclass
class LoadLine:
    number: int
    key: str
    value: Any


def read_jsonl(path: Path) -> list[LoadLine]:
    """Every line of `path` as a key and a value; a bad line is a usage error (exit 2),
    reported before anything is written."""
    lines = []
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except ValueError as error:
                raise click.UsageError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(data, dict) or not isinstance(data.get("key"), str):
                raise click.UsageError(
                    f'{path}:{number}: expected an object {{"key": "...", "value": ...}}'
                )
            lines.append(LoadLine(number, data["key"], data.get("value")))
    return lines


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@W_OPTION
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Writes in flight at once.",
)
@pass_context
def load(obj: Context, file: Path, w: int | None, concurrency: int) -> None:
    """Write every {"key": ..., "value": ...} line of FILE (JSON Lines), with a progress bar
    and a summary. Exits with the code of the first failure, after trying every line."""
    lines = read_jsonl(file)
    failures: list[tuple[LoadLine, KVError]] = []
    started = time.monotonic()
    progress = Progress(
        TextColumn("loading"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=obj.err,
        disable=obj.output == "json" or not obj.err.is_terminal,
    )

    async def run(advance: Callable[[], None]) -> None:
        queue = iter(lines)
        async with obj.async_client() as kv:

            async def worker() -> None:
                for line in queue:
                    try:
                        await kv.put(line.key, line.value, w=w)
                    except KVError as error:
                        failures.append((line, error))
                    advance()

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    with progress:
        task = progress.add_task("load", total=len(lines))
        asyncio.run(run(lambda: progress.advance(task)))
    elapsed = time.monotonic() - started
    summary = {
        "file": str(file),
        "lines": len(lines),
        "written": len(lines) - len(failures),
        "failed": len(failures),
        "seconds": round(elapsed, 3),
        "writes_per_s": round((len(lines) - len(failures)) / elapsed, 1) if elapsed else None,
    }
    if obj.output == "json":
        print_json(summary)
    else:
        obj.out.print(
            f"loaded {summary['written']} of {summary['lines']} lines from {file} in "
            f"{elapsed:.2f} s ({summary['writes_per_s']} writes/s); {len(failures)} failed",
            highlight=False,
        )
    for line, error in failures[:10]:
        obj.err.print(f"{file}:{line.number}: {line.key!r}: {error.reason}", highlight=False)
    if failures:
        sys.exit(exit_code(failures[0][1]))


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(kvctl completion bash)"."""
    from click.shell_completion import get_completion_class

    completer = get_completion_class(shell)
    assert completer is not None
    click.echo(completer(cli, {}, "kvctl", "_KVCTL_COMPLETE").source())


def main() -> None:
    cli(prog_name="kvctl")
