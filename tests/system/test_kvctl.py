"""kvctl (kv/cli.py) as a user runs it: subprocesses against a real cluster, exit codes and all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.cluster import LocalCluster, free_port

pytestmark = pytest.mark.timeout(120)
KVCTL = Path(sys.executable).with_name("kvctl")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("kvctl")
    with LocalCluster(followers=3, quorum=2, max_delay_ms=20, base_port=0, log_dir=logs) as c:
        yield c


def kvctl(
    *args: str, endpoints: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m kv ARGS` with KV_ENDPOINTS set (unless None) and return its result."""
    env = {k: v for k, v in os.environ.items() if k not in ("KV_ENDPOINTS", "KV_OUTPUT")}
    if endpoints is not None:
        env["KV_ENDPOINTS"] = endpoints
    return subprocess.run(
        [sys.executable, "-m", "kv", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def nodes(cluster: LocalCluster) -> str:
    return ",".join([cluster.leader_url, *cluster.follower_urls])


def test_the_console_script_is_installed_and_documents_its_exit_codes() -> None:
    assert KVCTL.exists(), f"{KVCTL} is missing: `make .venv/.installed` installs the project"
    result = subprocess.run([str(KVCTL), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for code in ("0  ok", "1  not found", "2  usage", "3  quorum", "4  conflict", "5  unreach"):
        assert code in result.stdout


def test_put_get_ls_del_and_their_exit_codes(cluster: LocalCluster) -> None:
    every = nodes(cluster)
    put = kvctl("-o", "json", "put", "cli/colour", '{"rgb": [0, 0, 255]}', endpoints=every)
    assert put.returncode == 0, put.stderr
    written = json.loads(put.stdout)
    assert written["value"] == {"rgb": [0, 0, 255]} and written["acks"] >= 2
    plain = kvctl("put", "cli/word", "blue", "--w", "3", endpoints=every)
    assert plain.returncode == 0 and "blue" in plain.stdout
    got = kvctl(
        "-o", "json", "get", "cli/colour", "--min-version", str(written["version"]),
        "--node", cluster.follower_urls[2], endpoints=every,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["value"] == {"rgb": [0, 0, 255]}
    listed = kvctl("ls", "--prefix", "cli/", endpoints=every)
    assert listed.stdout.split() == ["cli/colour", "cli/word"]
    missing = kvctl("get", "cli/nothing", endpoints=every)
    assert missing.returncode == 1 and "not found" in missing.stderr
    conflict = kvctl("put", "cli/word", "red", "--if-version", "1", endpoints=every)
    assert conflict.returncode == 4 and "version" in conflict.stderr
    deleted = kvctl("-o", "json", "del", "cli/word", endpoints=every)
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["deleted"] is True
    assert kvctl("del", "cli/word", endpoints=every).returncode == 1


def test_usage_errors_exit_2_and_say_why(cluster: LocalCluster, tmp_path: Path) -> None:
    assert kvctl("put", "only-a-key", endpoints=cluster.leader_url).returncode == 2
    bad_w = kvctl("put", "k", "1", "--w", "-1", endpoints=cluster.leader_url)
    assert bad_w.returncode == 2 and "--w" in bad_w.stderr
    assert kvctl("-o", "yaml", "ls").returncode == 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"key": "a", "value": 1}\n{"value": 2}\n')
    loaded = kvctl("load", str(broken), endpoints=cluster.leader_url)
    assert loaded.returncode == 2 and "broken.jsonl:2" in loaded.stderr
    assert kvctl("get", "a", endpoints=cluster.leader_url).returncode == 1  # nothing written


def test_quorum_not_reached_exits_3(cluster: LocalCluster) -> None:
    cluster.pause_follower(0)
    try:
        # w=3 of 3 with one follower frozen: the quorum cannot be met.
        result = kvctl("put", "cli/q", "1", "--w", "3", endpoints=cluster.leader_url)
    finally:
        cluster.resume_follower(0)
    assert result.returncode == 3, result.stderr
    assert "quorum" in result.stderr


def test_unreachable_exits_5_within_the_deadline() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = kvctl("--deadline", "0.5", "get", "k", endpoints=nowhere)
    assert result.returncode == 5 and "error" in result.stderr
    assert kvctl("--deadline", "0.5", "status", endpoints=nowhere).returncode == 5


def test_status_shows_every_node_even_those_only_the_leader_names(cluster: LocalCluster) -> None:
    result = kvctl("-o", "json", "status", endpoints=cluster.leader_url)
    assert result.returncode == 0, result.stderr
    rows = {row["node"]: row for row in json.loads(result.stdout)["nodes"]}
    assert set(rows) == {cluster.leader_url, *cluster.follower_urls}
    assert rows[cluster.leader_url]["role"] == "leader"
    assert rows[cluster.leader_url]["state"] == "leading"
    for url in cluster.follower_urls:
        assert rows[url]["role"] == "follower" and rows[url]["state"] in ("up", "lagging")
        assert {"term", "last_version", "lag", "leader"} <= set(rows[url])
    table = kvctl("status", endpoints=cluster.leader_url)
    assert table.returncode == 0 and "last version" in table.stdout and "leading" in table.stdout


def test_load_writes_every_line_and_summarises(cluster: LocalCluster, tmp_path: Path) -> None:
    data = tmp_path / "users.jsonl"
    data.write_text(
        "".join(json.dumps({"key": f"load/{i}", "value": i}) + "\n" for i in range(200))
    )
    result = kvctl("-o", "json", "load", str(data), endpoints=nodes(cluster))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["lines"], summary["written"], summary["failed"]) == (200, 200, 0)
    listed = kvctl("-o", "json", "ls", "--prefix", "load/", endpoints=cluster.leader_url)
    assert json.loads(listed.stdout)["count"] == 200
    text = kvctl("load", str(data), endpoints=cluster.leader_url)
    assert text.returncode == 0 and "loaded 200 of 200" in text.stdout


def test_watch_replays_and_follows_changes(cluster: LocalCluster) -> None:
    first = kvctl("-o", "json", "put", "watched/a", "1", endpoints=cluster.leader_url)
    since = json.loads(first.stdout)["version"] - 1
    kvctl("put", "watched/b", "2", endpoints=cluster.leader_url)
    kvctl("del", "watched/a", endpoints=cluster.leader_url)
    result = kvctl(
        "-o", "json", "watch", "--prefix", "watched/", "--since", str(since), "--count", "3",
        endpoints=cluster.follower_urls[0], timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["key"], e["deleted"]) for e in events] == [
        ("watched/a", False),
        ("watched/b", False),
        ("watched/a", True),
    ]


def test_shell_completion_scripts_are_printed() -> None:
    for shell in ("bash", "zsh", "fish"):
        result = kvctl("completion", shell)
        assert result.returncode == 0 and "_KVCTL_COMPLETE" in result.stdout
    env = {
        **os.environ,
        "_KVCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": "kvctl st",
        "COMP_CWORD": "1",
    }
    completed = subprocess.run(
        [sys.executable, "-c", "from kv.cli import cli; cli(prog_name='kvctl')"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert "status" in completed.stdout
