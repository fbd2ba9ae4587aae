"""The README and the docs: every curl and Python example runs against a real cluster, and
the site builds strictly, with nothing loaded from outside it.

Each Markdown file with runnable examples gets a fresh cluster (a leader and five
followers, as `make run` starts them, on free ports) and its examples run in the order a
reader meets them. tools/examples.py has the conventions; an example that cannot run here
is marked in the Markdown with its reason, and counted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.cluster import LocalCluster
from tools.examples import Example, find_examples, missing_fields, rewrite_ports

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLES = {path: find_examples(path, ROOT) for path in FILES}
RUNNABLE = {path: [e for e in found if e.not_run is None] for path, found in EXAMPLES.items()}

pytestmark = pytest.mark.timeout(300)


def test_there_are_examples_and_each_one_runs_or_says_why_not():
    every = [example for found in EXAMPLES.values() for example in found]
    runnable = [example for example in every if example.not_run is None]
    print(
        f"\n{len(every)} examples in {len(FILES)} files: {len(runnable)} run against a "
        f"cluster, {len(every) - len(runnable)} marked not run"
    )
    for example in every:
        if example.not_run is not None:
            print(f"  not run: {example.where} ({example.not_run})")
    assert len(runnable) >= 40
    assert all(e.not_run is None or len(e.not_run) > 10 for e in every), "say why, briefly"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(
        followers=5,
        quorum=3,
        max_delay_ms=50,
        base_port=0,
        log_dir=tmp_path / "logs",
        data_dir=tmp_path / "data",
    ) as running:
        yield running


@pytest.mark.parametrize(
    "path",
    [path for path, found in RUNNABLE.items() if found],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_the_examples_of_a_page(path: Path, cluster: LocalCluster, tmp_path: Path):
    ports = {8000: cluster.leader_url.removeprefix("http://")}
    ports |= {8001 + i: url.removeprefix("http://") for i, url in enumerate(cluster.follower_urls)}
    failures = []
    for example in RUNNABLE[path]:
        try:
            problem = run(example, ports, cluster, tmp_path)
        except KeyError as port:
            problem = f"port {port} is not the documented cluster's: mark the example not run"
        if problem:
            failures.append(f"{example.where}: {problem}\n    {example.code[:300]}")
    assert not failures, "\n".join(failures)


def run(example: Example, ports: dict[int, str], cluster: LocalCluster, scratch: Path) -> str:
    """What is wrong with the example's answer; "" when nothing is."""
    code = rewrite_ports(example.code, ports)
    if example.kind == "python":
        env = {**os.environ, "KV_ENDPOINTS": ",".join([cluster.leader_url, *cluster.follower_urls])}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        return "" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr[-800:]}"
    body = scratch / "body"
    limit = 2 if example.streams else 15
    command = f"{code} -sS -o {body} -w '%{{http_code}}' --max-time {limit}"
    done = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode not in ((0, 28) if example.streams else (0,)):
        return f"curl exit {done.returncode}: {done.stderr.strip()}"
    status = int(done.stdout[-3:])
    answer = body.read_text(errors="replace") if body.exists() else ""
    body.unlink(missing_ok=True)
    expected = example.status
    if (expected is None and not 200 <= status < 300) or (expected and status != expected):
        return f"status {status}, expected {expected or '2xx'}: {answer[:300]}"
    if answer.startswith("HTTP/"):  # curl -i: the headers, a blank line, the body
        answer = answer.split("\n\n", 1)[-1]
    missing = missing_fields(example.fields, answer)
    return f"fields {missing} are shown but not in the answer: {answer[:300]}" if missing else ""


def test_the_site_builds_strictly_and_loads_nothing_from_outside(tmp_path: Path):
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 20
    outside = re.compile(
        r"""(?:<script[^>]+src|<link[^>]+href|<img[^>]+src|<iframe[^>]+src)=["']?(?:https?:)?//"""
        r"""|@import\s+url\(["']?https?:|fonts\.googleapis|googletagmanager|cdn\.jsdelivr|unpkg\.com"""
    )
    for path in [*pages, *site.rglob("*.css")]:
        hits = outside.findall(path.read_text(errors="replace"))
        assert not hits, f"{path.relative_to(site)} loads from outside the site: {hits[:3]}"
    reference = (site / "api" / "reference.html").read_text()
    assert "POST <code>/keys</code>" in reference and "WriteRequest" in reference
