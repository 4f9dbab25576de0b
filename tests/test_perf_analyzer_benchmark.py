"""benchmarks/perf_analyzer.py where perf_analyzer is missing (here) and on the CSV it writes."""

from __future__ import annotations

import pytest

from benchmarks import perf_analyzer
from benchmarks.common import machine

CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency,Avg latency\n"
    "4,250.5,40,300,1000,200,12000,100,20,15500,16000,16500,17000,16000\n"
)


def test_missing_binary_exits_with_a_clear_message(tmp_path, capsys):
    status = perf_analyzer.main(["--binary", str(tmp_path / "perf_analyzer"), "--output-dir", str(tmp_path)])
    assert status == perf_analyzer.MISSING
    assert "perf_analyzer not found" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


def test_csv_rows_and_server_share_reach_the_report():
    rows = perf_analyzer.parse_csv(CSV)
    assert rows[0]["concurrency"] == 4 and rows[0]["infer_per_s"] == 250.5
    assert rows[0]["server_share"] == pytest.approx((1000 + 200 + 12000 + 100) / 16000)
    results = {
        "benchmark": "perf_analyzer",
        "config": {"task": "demo-task-0"},
        "machine": machine(),
        "rows": [{"protocol": "grpc", **rows[0]}],
    }
    text = perf_analyzer.build_report(results).markdown()
    assert "perf_analyzer -m demo-task-0" in text and "server_share" in text
