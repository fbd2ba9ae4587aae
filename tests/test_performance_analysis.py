"""performance_analysis.py: its statistics, and one real quick run against a local cluster."""

import csv
import json
from pathlib import Path

import pytest

import performance_analysis as pa
from kv.core.outbox import DelayModel
from tools.cluster import LocalCluster, free_port


def result(quorum: int, latency_ms: float, delays: list[float], status: int = 200):
    return pa.WriteResult(quorum, 0, "k", status, latency_ms, None, len(delays), 1, delays)


def test_percentile_interpolates_like_numpy():
    samples = [float(x) for x in range(1, 101)]
    assert pa.percentile(samples, 50) == pytest.approx(50.5)
    assert pa.percentile(samples, 99) == pytest.approx(99.01)
    assert pa.percentile([7.0], 95) == 7.0


def test_overhead_is_latency_minus_the_kth_smallest_reported_delay():
    write = result(quorum=2, latency_ms=130.0, delays=[300.0, 120.0, 40.0])
    assert write.kth_delay_ms() == 120.0
    assert write.overhead_ms() == pytest.approx(10.0)
    assert result(quorum=3, latency_ms=1.0, delays=[1.0]).overhead_ms() is None
    assert result(quorum=1, latency_ms=9.0, delays=[1.0], status=503).overhead_ms() is None


def test_summary_counts_failures_and_uses_the_order_statistic():
    writes = [result(3, 500.0 + i, [100.0, 200.0, 495.0 + i]) for i in range(10)]
    writes.append(result(3, 5000.0, [1.0], status=503))
    summary = pa.summarise(3, writes, DelayModel(0, 1000), n=5)
    assert (summary.writes, summary.failures) == (11, 1)
    assert summary.expected_ms == pytest.approx(500.0)
    assert summary.mean_ms == pytest.approx(504.5)
    assert summary.overhead_p50_ms == pytest.approx(5.0)


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


def test_with_no_cluster_running_it_starts_the_labs_own_and_stops_it(tmp_path: Path):
    nobody = f"http://127.0.0.1:{free_port()}"
    status = pa.main(
        ["--leader", nobody, "--quick", "--writes", "10", "--out", str(tmp_path / "out")]
    )
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
