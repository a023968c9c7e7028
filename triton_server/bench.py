"""Throughput of one model behind three front doors, measured in one run: ``/detect`` and ``/v2`` on
``attn-export serve``, and the real tritonserver on the Python-backend repository.

    python -m attn_export.triton_server.bench [MODEL] [--concurrency 8] [--requests 60] [--rounds 3]
                                             [--duration 60] [--threads 1] [--max-batch 4] [--json OUT]

MODEL is a ``.onnx`` graph or a checkpoint (exported first, unverified). Both servers run in child
processes on 127.0.0.1 (free ports) with the same onnxruntime thread count, max batch and batching
delay, and are always ended. C clients (a closed loop: each sends its next request when the last is
answered) send one image per request, the same images to every target: ``/detect`` as multipart,
``/v2`` and Triton the same binary-tensor infer request. Each round runs every target in turn for
``--requests`` requests (or ``--duration`` seconds, whichever comes first) after a short warm-up; on a
shared machine the load drifts, so the rounds interleave the targets and the figures are their sums.
Prints a markdown table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attn_export.files import write_text

TARGETS = ("detect", "v2", "triton")


@dataclass
class Result:
    target: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        lat = np.array(self.latencies_ms or [0.0])
        return {
            "target": self.target,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "rps": round(self.rps, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(count: int = 8) -> list[bytes]:
    from PIL import Image

    from attn_export.shapes.data import generate

    out = []
    for i in range(count):
        arr, _ = generate(4242, i, size=(320 + 40 * (i % 3), 320))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def v2_body(image: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor infer request for one image (what tritonclient sends), and its headers."""
    raw = len(image).to_bytes(4, "little") + image
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(raw)}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


async def _run(target: str, url: str, name: str, images: list[bytes], concurrency: int, requests: int, duration: float):
    import httpx

    result = Result(target)
    bodies = [v2_body(img) for img in images]
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # no response compression, as tritonclient does by default
    async with httpx.AsyncClient(timeout=120, limits=limits, headers={"Accept-Encoding": "identity"}) as client:

        async def one(i: int) -> bool:
            img = images[i % len(images)]
            if target == "detect":
                r = await client.post(f"{url}/detect", files={"images": ("a.jpg", img, "image/jpeg")})
            else:
                body, headers = bodies[i % len(bodies)]
                r = await client.post(f"{url}/v2/models/{name}/infer", content=body, headers=headers)
            return r.status_code == 200

        for i in range(concurrency):  # warm-up, not counted
            await one(i)
        deadline = time.perf_counter() + duration
        t0 = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() < deadline:
                i = next(counter)
                if i >= requests:
                    return
                s = time.perf_counter()
                try:
                    ok = await one(i)
                except httpx.HTTPError:
                    ok = False
                result.latencies_ms.append((time.perf_counter() - s) * 1000)
                result.requests += 1
                result.errors += 0 if ok else 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_export.triton_server.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", type=Path, default=Path("models/shapes_detector.pt"))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=60, help="requests per target and round (default 60)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=60.0, help="at most this many seconds per target and round")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads in each server (default 1)")
    p.add_argument("--max-batch", type=int, default=4, help="max batch of both servers' batchers (default 4)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from attn_export.detection.loader import model_kind
    from attn_export.triton_server.launcher import TritonServer, wait_until_ready
    from attn_export.triton_server.repository import write_repository

    work = Path(tempfile.mkdtemp(prefix="attn-export-bench-"))
    model = args.model
    if model_kind(model) == "checkpoint":
        from attn_export.triton_server.repository import export_network

        print(f"exporting {model} (unverified) ...", file=sys.stderr)
        model = export_network(model, work, max(args.max_batch, 2), verify=False).path
    name = model.stem
    repo = write_repository(model, work / "repo", max_batch=args.max_batch, threads=args.threads).path
    ours_port = _free_port()
    ours_url = f"http://127.0.0.1:{ours_port}"
    env = {**os.environ, "ATTN_EXPORT_ACCESS_LOG": "false", "ATTN_EXPORT_LOG_LEVEL": "warning"}
    ours = subprocess.Popen(
        [sys.executable, "-m", "attn_export.serve.cli", str(model), "--port", str(ours_port), "--threads",
         str(args.threads), "--max-batch", str(args.max_batch), "--max-wait-ms", "5"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    triton = TritonServer(repo, _free_port(), _free_port(), _free_port(), log_path=work / "triton.log", exit_timeout=2)
    results = {t: Result(t) for t in TARGETS}
    try:
        triton.start().wait_ready(120)
        wait_until_ready(f"{ours_url}/readyz", ours, 120)
        images = _images()
        urls = {"detect": ours_url, "v2": ours_url, "triton": triton.url}
        for r in range(args.rounds):
            for target in TARGETS:
                res = asyncio.run(
                    _run(target, urls[target], name, images, args.concurrency, args.requests, args.duration)
                )
                agg = results[target]
                agg.requests += res.requests
                agg.errors += res.errors
                agg.seconds += res.seconds
                agg.latencies_ms += res.latencies_ms
                print(f"round {r + 1} {target}: {res.rps:.2f} req/s ({res.errors} errors)", file=sys.stderr)
    finally:
        triton.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ours.pid, signal.SIGTERM)
        try:
            ours.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(ours.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    base = results["detect"].rps or 1.0
    label = {"detect": "attn-export serve, POST /detect", "v2": "attn-export serve, POST /v2 infer",
             "triton": "tritonserver 2.51, Python backend"}  # fmt: skip
    print(f"\n{name}, concurrency {args.concurrency}, onnxruntime threads {args.threads}, max batch {args.max_batch}, "
          f"{args.rounds} rounds x {args.requests} requests; {platform.node()} ({os.cpu_count()} CPUs)")  # fmt: skip
    print("| target | requests | errors | req/s | p50 ms | p99 ms | vs /detect |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for t in TARGETS:
        s = results[t].summary()
        print(f"| {label[t]} | {s['requests']} | {s['errors']} | {s['rps']:.2f} | {s['p50_ms']} | {s['p99_ms']} | "
              f"{results[t].rps / base:.2f}x |")  # fmt: skip
    if args.json:
        summary = {"args": {k: str(v) for k, v in vars(args).items()}}
        summary["results"] = [results[t].summary() for t in TARGETS]
        write_text(args.json, json.dumps(summary, indent=2))
    return 0 if all(results[t].errors == 0 for t in TARGETS) else 1


if __name__ == "__main__":
    sys.exit(main())
