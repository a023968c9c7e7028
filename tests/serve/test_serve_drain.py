"""Shutdown drains: SIGTERM while requests are in flight lets them finish, then the server exits cleanly."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from serve_helpers import cell_square, free_port, make_image

SERVER = textwrap.dedent(
    """
    import sys, time
    import uvicorn
    from attn_export.serve.app import create_app
    from attn_export.detection.loader import load
    from attn_export.serve.settings import Settings

    def slow_loader(settings):
        model = load(settings)
        fast = model.infer

        def infer(batch):  # each inference call takes 0.6 s: requests stay in flight
            time.sleep(0.6)
            return fast(batch)

        model.infer = infer
        return model

    settings = Settings(model=sys.argv[1], threads=1, warmup=False, max_batch=2, max_wait_ms=0)
    app = create_app(settings, loader=slow_loader)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), timeout_graceful_shutdown=30, log_level="info")
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_drains_requests_in_flight(standin_onnx, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(standin_onnx), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        else:
            pytest.fail("the server did not get ready")

        def detect(i):
            img = make_image((320, 320), [cell_square(i % 3, i, i)])
            r = httpx.post(f"{url}/detect", files={"images": ("a.png", img, "image/png")}, timeout=60)
            return r.status_code, r.json()

        # 5 requests, batches of 2 taking 0.6 s each: about 1.8 s of work in flight when SIGTERM comes
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(detect, i) for i in range(5)]
            deadline = time.monotonic() + 20
            while True:  # until all 5 reached the server (in flight, but for the metrics request, or done)
                metrics = httpx.get(f"{url}/metrics", timeout=5).text
                in_flight = float(re.search(r"^attn_export_http_requests_in_flight (\S+)$", metrics, re.M)[1])
                done = re.search(
                    r'^attn_export_http_requests_total\{method="POST",route="/detect",status="200"\} (\S+)$',
                    metrics,
                    re.M,
                )
                if in_flight - 1 + (float(done[1]) if done else 0) >= 5:
                    assert in_flight >= 3, "too late: most requests finished before SIGTERM"
                    break
                assert time.monotonic() < deadline, metrics
                time.sleep(0.02)
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        for i, (status, body) in enumerate(results):
            assert status == 200, body
            (det,) = body["images"][0]["detections"]
            assert det["class_id"] == i % 3 and det["box"][:2] == [32.0 * i, 32.0 * i]
        # uvicorn re-raises the signal once it has shut down cleanly: the exit status says SIGTERM
        assert proc.wait(30) in (0, -signal.SIGTERM)
        assert time.monotonic() - t_term > 0.5  # it waited for the work, it did not drop it
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
        log.seek(0)
        text = log.read()
        assert "Waiting for" in text or "Shutting down" in text, text
        assert "Application shutdown complete" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_cli_with_two_workers(standin_onnx, tmp_path):
    """``attn-export serve --workers 2``: settings reach the worker processes through the environment."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115
    cmd = [sys.executable, "-m", "attn_export.serve.cli", str(standin_onnx), "--port", str(port), "--workers", "2"]
    cmd += ["--threads", "1", "--max-batch", "3", "--no-warmup", "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTN_EXPORT_")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env | {"ATTN_EXPORT_API_KEY": "k2"})
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        assert httpx.get(f"{url}/readyz").json()["max_batch"] == 3
        img = make_image((320, 320), [cell_square(2, 1, 2)])
        files = {"images": ("a.png", img, "image/png")}
        assert httpx.post(f"{url}/detect", files=files, timeout=30).status_code == 401  # the key reached them
        r = httpx.post(f"{url}/detect", files=files, headers={"X-API-Key": "k2"}, timeout=30)
        assert r.json()["images"][0]["detections"][0]["box"] == [64.0, 32.0, 96.0, 64.0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
