"""Load test of the detection service on loopback: requests per second and latency at several concurrencies,
against the same model's raw runner throughput in-process.

    python -m attn_export.bench.loadtest [MODEL] [--concurrency 1,4,16] [--requests 200] [--duration 30]

It starts ``attn-export serve MODEL`` on 127.0.0.1 (a free port) in a child process, or uses a running
server given with ``--url`` (loopback addresses only). At each concurrency C, C clients each send one
image per request, back to back (a closed loop), until ``--requests`` requests are answered or
``--duration`` seconds pass, after a short warm-up that is not counted. The raw throughput is
``runner.infer`` on batches of ``--max-batch`` letterboxed images in this process (no HTTP, no decoding,
no NMS), the model loaded with the server's settings, at the server's max batch. On a shared machine
the load drifts, so each level runs in ``--rounds`` parts with a raw timing before each part and one
after the last, and its ratio is against the mean of those. The report is a markdown
table; ``--json`` also writes the numbers.

    python -m attn_export.bench.loadtest [MODEL] --scenario abuse   (or overload,slow,memory,limits)

tries the server as a hostile user would, each part bounded in time: ``overload`` (64, 128 and 256
closed-loop clients for 30 s each, a 503 making a client wait its Retry-After; the latency of the answered
requests, the 503s, and ``/healthz`` and ``/readyz`` asked every 50 ms meanwhile), ``slow`` (50 uploads
sending a byte every 0.5 s, and connections sending nothing, half a header, or the headers and 4 body
bytes, watched for 40 s), ``memory`` (the server's RSS cold, warm, at its peak during bursts of 12
concurrent requests of 16 full-HD JPEGs, and 10 s later) and ``limits`` (20 images in a request, 16-bit
PNGs, clients that leave, and what the metrics say of them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attn_export.bench.load_abuse import (
    SCENARIOS,
    abuse_report,
    scenario_grpc_memory,
    scenario_hostage,
    scenario_limits,
    scenario_memory,
    scenario_overload,
    scenario_slow,
)
from attn_export.bench.load_client import Report, check_loopback, run_level, sample_images
from attn_export.detection.loader import LoadOptions, default_model


@dataclass
class ServerOptions(LoadOptions):
    """The model as the server loads it, and the batcher's knobs the load test starts it with."""

    max_wait_ms: float = 5.0
    queue_size: int = 128


# ------------------------------------------------------------------------------------------ raw runner
def load_raw(settings: ServerOptions, images: list[bytes], max_batch: int):
    """The model loaded in this process as the server loads it; returns ``time(seconds) -> images/s`` of
    ``infer`` on batches of ``max_batch`` letterboxed images (no HTTP, decoding or NMS)."""
    from attn_export.detection.imaging import decode
    from attn_export.detection.loader import load

    model = load(settings)
    inputs = [decode(data, model.input_size).input for data in images]
    batch = np.stack([inputs[i % len(inputs)] for i in range(max_batch)])
    model.infer(batch)  # warm-up

    def measure(seconds: float, max_runs: int = 1000) -> float:
        runs, t0 = 0, time.perf_counter()
        while runs < max_runs and (runs < 2 or time.perf_counter() - t0 < seconds):
            model.infer(batch)
            runs += 1
        return runs * len(batch) / (time.perf_counter() - t0)

    return measure


# ------------------------------------------------------------------------------------------ the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(settings, extra_args: list[str] | None = None, timeout: float = 600.0, pids: list | None = None):
    """``attn-export serve`` on 127.0.0.1 in a child process; yields its URL (its pid is appended to ``pids``)."""
    import tempfile

    import httpx

    port = _free_port()
    cmd = [
        sys.executable, "-m", "attn_export.serve.cli", str(settings.model),
        "--backend", settings.backend, "--host", "127.0.0.1", "--port", str(port),
        "--max-wait-ms", str(settings.max_wait_ms),
        "--queue-size", str(settings.queue_size), "--no-access-log", "--log-level", "warning",
        *(["--threads", str(settings.threads)] if settings.threads else []),
        *(["--max-batch", str(settings.max_batch)] if settings.max_batch else []),
        *(extra_args or []),
    ]  # fmt: skip
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    if pids is not None:
        pids.append(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"loadtest: the server exited with status {proc.returncode}: {log.read()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("loadtest: the server did not get ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ------------------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_export.bench.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", type=Path, help="the model to serve (default: the shipped shapes detector)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"))
    p.add_argument("--url", help="load a running server at this loopback URL instead of starting one")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=200, help="requests counted per level, at most (default 200)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level, at most (default 30)")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds of each raw runner timing (default 3)")
    p.add_argument(
        "--rounds", type=int, default=4, help="parts of each level, each after a raw runner timing (default 4)"
    )
    p.add_argument("--max-batch", type=int, help="the server's max batch, and the raw batch (default: the server's)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--queue-size", type=int, default=128)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads, for the server and the raw runner")
    p.add_argument("--images", type=int, default=8, help="distinct images sent in turn (default 8)")
    p.add_argument("--conf", type=float, help="the conf parameter of each request (default: the server's)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    g = p.add_argument_group(
        "abuse scenarios (--scenario abuse, or some of overload,slow,memory,limits,grpc_memory,hostage)"
    )
    g.add_argument(
        "--scenario", default="throughput", help="throughput (default: the table above), abuse, or a comma list"
    )
    g.add_argument("--overload-levels", default="64,128,256", help="client counts of the overload scenario")
    g.add_argument("--overload-seconds", type=float, default=30.0, help="seconds per overload level (default 30)")
    g.add_argument("--slow-clients", type=int, default=50, help="uploads sending one byte every 0.5 s (default 50)")
    g.add_argument("--idle-clients", type=int, default=10, help="connections of each idle kind (default 10)")
    g.add_argument("--slow-seconds", type=float, default=40.0, help="how long the slow scenario watches (default 40)")
    g.add_argument("--bursts", type=int, default=3, help="memory scenario: bursts of 12 x 16 full-HD JPEGs (3)")
    g.add_argument("--burst-clients", type=int, default=12, help="memory scenario: concurrent requests (12)")
    g.add_argument("--grpc-clients", type=int, default=40, help="grpc_memory: concurrent clients (default 40)")
    g.add_argument("--grpc-body-mib", type=float, default=19.0, help="grpc_memory: MiB per request (default 19)")
    g.add_argument("--grpc-port", type=int, help="grpc_memory with --url: the server's gRPC port")
    g.add_argument("--hostage-levels", default="8,64", help="hostage: client counts (default 8,64)")
    g.add_argument("--hostage-seconds", type=float, default=15.0, help="hostage: seconds per level (default 15)")
    g.add_argument("--settle-seconds", type=float, default=10.0, help="memory scenarios: wait before 'after' (10)")
    g.add_argument("--pid", type=int, help="with --url: the server's process id (for its memory)")
    g.add_argument("--server-arg", action="append", default=[], help="an extra option of the server started")
    return p


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU model unknown"


def _machine() -> str:
    loads = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{_cpu_model()}, {os.cpu_count()} CPUs, load average {loads} at start"


def _server_url(stack: contextlib.ExitStack, args: argparse.Namespace, settings, pids: list | None = None) -> str:
    """The server to load: ``--url`` (loopback only; ``--pid`` appended to ``pids``), or one started for
    the run (closed with ``stack``; its pid appended to ``pids``)."""
    if args.url:
        check_loopback(args.url)
        if args.pid and pids is not None:
            pids.append(args.pid)
        return args.url
    return stack.enter_context(start_server(settings, args.server_arg, pids=pids))


def _abuse(args: argparse.Namespace, settings) -> int:
    wanted = SCENARIOS if args.scenario == "abuse" else tuple(x.strip() for x in args.scenario.split(","))
    unknown = [w for w in wanted if w not in SCENARIOS]
    if unknown:
        raise SystemExit(f"loadtest: unknown scenario {unknown}; choose from throughput, abuse, {', '.join(SCENARIOS)}")
    results: dict = {"machine": _machine()}
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        pids: list[int] = []
        grpc_port = args.grpc_port
        if "grpc_memory" in wanted and not args.url:
            grpc_port = _free_port()
            args.server_arg = [*args.server_arg, "--grpc-port", str(grpc_port)]
        url = _server_url(stack, args, settings, pids)
        if "limits" in wanted:
            results["limits"] = scenario_limits(url)
        if "memory" in wanted:
            if not pids:
                raise SystemExit("loadtest: the memory scenario needs the server's --pid with --url")
            results["memory"] = scenario_memory(
                url, pids[0], concurrency=args.burst_clients, bursts=args.bursts, settle_s=args.settle_seconds
            )
        if "grpc_memory" in wanted:
            if not pids or not grpc_port:
                raise SystemExit(
                    "loadtest: the grpc_memory scenario needs the server's --pid and --grpc-port with --url"
                )
            results["grpc_memory"] = scenario_grpc_memory(
                url, pids[0], grpc_port, args.grpc_clients, args.grpc_body_mib, args.settle_seconds
            )
        if "hostage" in wanted:
            levels = [int(c) for c in args.hostage_levels.split(",") if c.strip()]
            results["hostage"] = scenario_hostage(url, levels, args.hostage_seconds)
        if "overload" in wanted:
            levels = [int(c) for c in args.overload_levels.split(",") if c.strip()]
            results["overload"] = scenario_overload(url, levels, args.overload_seconds)
        if "slow" in wanted:
            results["slow"] = scenario_slow(url, args.slow_clients, args.idle_clients, args.slow_seconds)
    results["seconds"] = time.perf_counter() - t_start
    print(f"model {settings.model} on {settings.backend}; {results['machine']}; {results['seconds']:.0f} s")
    print(abuse_report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from attn_export.detection.loader import ModelError

    try:
        return _main(parser().parse_args(argv))
    except ModelError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    settings = ServerOptions(
        model=args.model or default_model(),
        backend=args.backend,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        threads=args.threads,
    )
    if settings.model is None:
        raise SystemExit("loadtest: no model: give MODEL (models/shapes_detector.onnx is not here)")
    if args.scenario != "throughput":
        return _abuse(args, settings)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    images = sample_images(args.images)
    print(f"loadtest: {settings.model} on {settings.backend}, {len(images)} images, levels {levels}", file=sys.stderr)

    with contextlib.ExitStack() as stack:
        url = _server_url(stack, args, settings)
        import httpx

        info = httpx.get(f"{url}/readyz", timeout=10).json()
        max_batch = int(info["max_batch"])
        raw_model = load_raw(settings, images, max_batch)
        raw: list[float] = []
        report = Report(
            model=str(settings.model),
            backend=info.get("backend", settings.backend),
            provider=info.get("provider", ""),
            max_batch=max_batch,
            raw_images_per_s=0.0,
            raw_runs=raw,
            machine=_machine(),
        )
        params = {"conf": args.conf} if args.conf is not None else {}
        for c in levels:
            level, raws = run_level(
                url, images, c, args.requests, args.duration, params, args.rounds, raw_model, args.raw_seconds
            )
            raw += raws
            report.levels.append(level)
            print(
                f"  concurrency {c}: {level.rps:.2f} req/s, p50 {level.p50_ms:.0f} ms, p99 {level.p99_ms:.0f} ms, "
                f"mean batch {level.mean_batch:.2f}, raw runner {np.mean(raws):.2f} images/s, {level.ratio:.0%}",
                file=sys.stderr,
            )
    report.raw_images_per_s = float(np.mean(raw))
    print(f"model {report.model} on {report.backend} ({report.provider}); {report.machine}")
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
