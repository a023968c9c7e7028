"""The load script, briefly: it starts the server (the real CLI, in a child process), loads it on loopback
at two concurrencies and reports throughput, latency and the ratio to the raw runner."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"])
def test_loopback_urls_pass(url):
    loadtest.check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:80"])
def test_other_urls_are_refused(url):
    with pytest.raises(SystemExit, match="not a loopback address"):
        loadtest.check_loopback(url)


def test_build_request_is_a_multipart_post():
    payload = loadtest.build_request("http://127.0.0.1:8000", {"conf": 0.5}, b"\xff\xd8\xffdata", "a.jpg")
    head, _, body = payload.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /detect?conf=0.5 HTTP/1.1\r\nHost: 127.0.0.1:8000")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b'name="images"; filename="a.jpg"' in body and b"\xff\xd8\xffdata" in body


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
