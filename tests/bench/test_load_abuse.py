"""The abuse scenarios of the load script, briefly (short timeouts, few clients): each reports what the
server did."""

from __future__ import annotations

import json

import pytest

from attn_export.bench import loadtest


def test_abuse_scenarios_run_and_report(standin_onnx, tmp_path, capsys):
    """The abuse scenarios, briefly (short timeouts, few clients): each reports what the server did."""
    out = tmp_path / "abuse.json"
    argv = [str(standin_onnx), "--scenario", "limits,overload,slow", "--threads", "1", "--json", str(out)]
    argv += ["--overload-levels", "4", "--overload-seconds", "2", "--slow-clients", "2", "--idle-clients", "1"]
    argv += ["--slow-seconds", "3", "--server-arg=--header-timeout-s=1", "--server-arg=--body-timeout-s=1"]
    assert loadtest.main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "| clients | 200s |" in text and "| connection | count |" in text
    limits = report["limits"]
    assert limits["twenty_images"].startswith("413 too_many_images")
    d = limits["disconnects"]
    # each is counted once, by what happened (the stand-in may answer one within the 20 ms its client waits)
    assert d["counted_waiting"] + d["answered_200"] == 12 and d["counted_waiting"] >= 8
    assert (d["counted_reading"], d["counted_as_400"], d["answered_503"]) == (10, 0, 0)
    assert all(r["detections_8bit"] == r["detections_16bit"] for r in limits["png16"])
    (level,) = report["overload"]
    assert level["clients"] == 4 and level["ok"] > 0 and level["errors"] == 0 and level["healthz_n"] > 0
    for row in report["slow"]["rows"]:  # every abusive connection was cut at about the 1 s timeout
        assert row["open_at_end"] == 0 and 0.5 < row["closed_after_s_max"] < 2.9, row
    assert report["slow"]["legit_ok"] > 0


def test_grpc_memory_and_hostage_scenarios_run_and_report(standin_onnx, tmp_path, capsys):
    """The gRPC memory scenario (the same bodies over v2 HTTP and gRPC, RSS peak and after) and the byte-budget
    hostage scenario, briefly: the gRPC burst stays in the door's budget, and the normal client is answered
    while clients declaring 20 MiB bodies send nothing or a byte a second."""
    pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc")
    out = tmp_path / "abuse.json"
    argv = [str(standin_onnx), "--scenario", "grpc_memory,hostage", "--threads", "1", "--json", str(out)]
    argv += ["--grpc-clients", "6", "--grpc-body-mib", "3", "--settle-seconds", "2"]
    argv += ["--hostage-levels", "8", "--hostage-seconds", "4"]
    assert loadtest.main(argv) == 0
    text = capsys.readouterr().out
    assert "| protocol | peak MB |" in text and "| hostage clients |" in text and loadtest._cpu_model() in text
    report = json.loads(out.read_text())
    g = report["grpc_memory"]
    assert g["body_bytes"] > 3_000_000 and g["warm_mb"] > 0
    for name, ok in (("http", "200"), ("grpc", "OK")):
        answers = g[name]["answers"]
        assert sum(answers.values()) == 6 and answers.get(ok, 0) >= 1, answers
        assert set(answers) <= {ok, "503", "UNAVAILABLE"}, answers
        assert g[name]["peak_mb"] >= g["warm_mb"] * 0.5 and g[name]["after_over_warm"] < 1.5
    (row,) = report["hostage"]
    assert row["hostages"] == 8 and row["hostage_connections"] >= 8
    assert row["normal_sent"] > 3 and row["normal_ok"] == row["normal_sent"], row
    assert row["door_bytes_max_mb"] <= 160.0
