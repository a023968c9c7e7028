"""The load script, briefly: it starts the server (the real CLI, in a child process), loads it on loopback
at two concurrencies and reports throughput, latency and the ratio to the raw runner."""

from __future__ import annotations

import json

from attn_export.bench import loadtest


def test_loadtest_reports_a_table(standin_onnx, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = [str(standin_onnx), "--concurrency", "1,4", "--requests", "12", "--duration", "10"]
    argv += ["--raw-seconds", "0.2", "--rounds", "2", "--images", "2", "--threads", "1", "--json", str(out)]
    assert loadtest.main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["max_batch"] == 4  # the server's default on a CPU, and the raw runner's batch
    assert "| concurrency | requests |" in text and "raw runner, batch 4" in text
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["requests"] == 12 and lv["errors"] == 0 and lv["rps"] > 0 and lv["ratio"] > 0
        assert lv["p99_ms"] >= lv["p50_ms"] > 0 and lv["mean_batch"] >= 1
    assert report["raw_images_per_s"] > 0 and len(report["raw_runs"]) == 6
    assert report["backend"] == "onnxruntime"
