"""performance_analysis.py end to end: quick real runs against local clusters."""

import csv
import json
from pathlib import Path

import pytest

import performance_analysis as pa
from tools.cluster import LocalCluster, free_port


def test_a_quick_run_writes_every_output_and_a_consistency_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with LocalCluster(followers=3, max_delay_ms=50, base_port=0, log_dir=tmp_path / "logs") as c:
        status = pa.main(
            [
                "--leader", c.leader_url,
                "--followers", ",".join(c.follower_urls),
                "--quick", "--writes", "12", "--concurrency", "4", "--keys", "3",
                "--out", str(tmp_path / "out"),
            ]
        )  # fmt: skip
    assert status == 0
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "writes.csv").open()))
    assert len(rows) == 3 * 12
    assert {row["quorum"] for row in rows} == {"1", "2", "3"}
    assert all(row["status"] == "200" and row["delays_ms"] for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert [q["quorum"] for q in summary["quorums"]] == [1, 2, 3]
    assert summary["consistency"]["converged"] is True
    assert (out / "quorum_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "ovh50" in printed and "consistent" in printed


def test_local_starts_the_labs_own_cluster_and_stops_it(tmp_path: Path):
    status = pa.main(["--local", "--quick", "--writes", "10", "--out", str(tmp_path / "out")])
    assert status == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    settings = summary["settings"]
    assert (settings["followers"], settings["min_delay_ms"], settings["max_delay_ms"]) == (
        5,
        0,
        1000,
    )
    assert [q["quorum"] for q in summary["quorums"]] == [1, 2, 3, 4, 5]
    assert not pa.cluster_answers(settings["leader"]), "the script stops the cluster it started"


def test_leader_alone_takes_its_followers_from_the_leader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with LocalCluster(followers=2, max_delay_ms=20, base_port=0) as c:
        status = pa.main(
            ["--leader", c.leader_url, "--quick", "--writes", "5", "--out", str(tmp_path)]
        )
    assert status == 0
    captured = capsys.readouterr()
    assert f"measuring the running cluster at {c.leader_url} (2 followers)" in captured.err
    assert "warm-up (discarded)" in captured.err
    for url in c.follower_urls:
        assert url in captured.out, "each follower's consistency verdict"


def test_a_leader_that_does_not_answer_is_an_error_not_a_silent_substitute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    nobody = f"http://127.0.0.1:{free_port()}"
    assert pa.main(["--leader", nobody, "--quick", "--out", str(tmp_path)]) == 1
    assert f"no leader answers at {nobody}" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_the_staleness_study_measures_predicts_and_proves_min_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from tools import staleness

    out = tmp_path / "staleness"
    status = staleness.main(
        [
            "--followers", "3", "--max-delay-ms", "300", "--step-ms", "150",
            "--samples", "4", "--quorums", "1", "3", "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [row["t_ms"] for row in summary["table"]] == [0, 150, 300]
    assert all(row["W3"] == 1.0 and row["W3_predicted"] == 1.0 for row in summary["table"])
    assert summary["min_version"] == {"reads": 8, "stale": 0}
    assert (out / "staleness_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert "measured / predicted" in capsys.readouterr().out
