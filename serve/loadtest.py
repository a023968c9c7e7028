"""Load test of the detection service on loopback: requests per second and latency at several concurrencies,
against the same model's raw runner throughput in-process.

    python -m attn_export.serve.loadtest [MODEL] [--concurrency 1,4,16] [--requests 200] [--duration 30]

It starts ``attn-export serve MODEL`` on 127.0.0.1 (a free port) in a child process, or uses a running
server given with ``--url`` (loopback addresses only). At each concurrency C, C clients each send one
image per request, back to back (a closed loop), until ``--requests`` requests are answered or
``--duration`` seconds pass, after a short warm-up that is not counted. The raw throughput is
``runner.infer`` on batches of ``--max-batch`` letterboxed images in this process (no HTTP, no decoding,
no NMS), the model loaded with the server's settings, at the server's max batch. On a shared machine
the load drifts, so each level runs in ``--rounds`` parts with a raw timing before each part and one
after the last, and its ratio is against the mean of those. The report is a markdown
table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

LOOPBACK_NAMES = ("localhost",)


@dataclass
class Level:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    ratio: float = 0.0


@dataclass
class Report:
    model: str
    backend: str
    provider: str
    max_batch: int
    raw_images_per_s: float
    raw_runs: list[float]
    levels: list[Level] = field(default_factory=list)
    machine: str = ""

    def table(self) -> str:
        lines = [
            "| concurrency | requests | errors | req/s | p50 ms | p99 ms | mean batch | vs raw runner |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lv in self.levels:
            lines.append(
                f"| {lv.concurrency} | {lv.requests} | {lv.errors} | {lv.rps:.2f} | {lv.p50_ms:.1f} | {lv.p99_ms:.1f} "
                f"| {lv.mean_batch:.2f} | {lv.ratio:.0%} |"
            )
        runs = ", ".join(f"{r:.1f}" for r in self.raw_runs)
        lines.append(
            f"| raw runner, batch {self.max_batch} | | | {self.raw_images_per_s:.2f} images/s (runs: {runs}) | | | | |"
        )
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ inputs
def sample_images(count: int = 8, seed: int = 7) -> list[bytes]:
    """JPEG images of the shapes data set (or plain drawn shapes where it cannot be generated)."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(count):
        try:
            from attn_export.data.shapes import generate

            arr, _ = generate(seed, i)
            img = Image.fromarray(arr)
        except Exception:  # scikit-image (the shapes backgrounds) may be missing
            rng = np.random.default_rng(seed + i)
            img = Image.new("RGB", (400, 300), tuple(int(v) for v in rng.integers(0, 255, 3)))
            draw = ImageDraw.Draw(img)
            for _ in range(4):
                x, y = (int(v) for v in rng.integers(0, 300, 2))
                draw.ellipse((x, y, x + 60, y + 60), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def check_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"loadtest: {url} is not a loopback address; this tool only loads servers on this machine")


# ------------------------------------------------------------------------------------------ raw runner
def load_raw(settings, images: list[bytes], max_batch: int):
    """The model loaded in this process as the server loads it; returns ``time(seconds) -> images/s`` of
    ``infer`` on batches of ``max_batch`` letterboxed images (no HTTP, decoding or NMS)."""
    from attn_export.serve.imaging import decode
    from attn_export.serve.loader import load

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


# ------------------------------------------------------------------------------------------ HTTP load
def build_request(url: str, params: dict, data: bytes, name: str) -> bytes:
    """The bytes of one ``POST /detect`` with one multipart image (HTTP/1.1, keep-alive)."""
    parts = urllib.parse.urlsplit(url)
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    boundary = "attn-export-loadtest-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {parts.path.rstrip('/')}/detect{query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """``(status, body, keep_alive)`` of one HTTP/1.1 response."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("the server closed the connection")
    status = int(line.split()[1])
    length, chunked, keep = 0, False, True
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        key, value = key.strip().lower(), value.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif key == "connection" and value == "close":
            keep = False
    if not chunked:
        return status, await reader.readexactly(length), keep
    body = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body, keep
        body += chunk[:-2]


class _Connection:
    """One keep-alive HTTP/1.1 connection: a light client, so the load generator takes little CPU."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(payload)
            await self.writer.drain()
            status, body, keep = await _read_response(self.reader)
        except BaseException:
            await self.close()
            raise
        if not keep:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _load(
    url: str, images: list[bytes], concurrency: int, requests: int, seconds: float, warmup: int, params: dict
):
    payloads = [build_request(url, params, data, f"{i}.jpg") for i, data in enumerate(images)]
    latencies: list[float] = []
    errors = 0
    sent = 0
    conns = [_Connection(url) for _ in range(concurrency)]

    async def post(conn: _Connection, i: int) -> float:
        t = time.perf_counter()
        status, body = await conn.request(payloads[i % len(payloads)])
        if status != 200:
            raise RuntimeError(f"{status}: {body[:200]!r}")
        return time.perf_counter() - t

    await asyncio.gather(*(post(conns[i % concurrency], i) for i in range(warmup)))
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    t_end: float | None = None  # the first moment a client has nothing more to send
    done_at: list[float] = []

    async def worker(conn: _Connection) -> None:
        nonlocal sent, errors, t_end
        while sent < requests and time.perf_counter() < deadline:
            i = sent
            sent += 1
            try:
                latencies.append(await post(conn, i))
                done_at.append(time.perf_counter())
            except Exception:
                errors += 1
        if t_end is None:
            t_end = time.perf_counter()

    await asyncio.gather(*(worker(c) for c in conns))
    # Throughput counts the answers while every client was busy (t0 to t_end): the last requests,
    # answered at a falling concurrency, would bias it down. Latencies count every answer.
    t_end = t_end or time.perf_counter()
    counted = sum(1 for t in done_at if t <= t_end)
    elapsed = t_end - t0
    for conn in conns:
        await conn.close()
    return latencies, errors, elapsed, counted


def _batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text

    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("attn_export_batch_size_sum"), value("attn_export_batch_size_count")


def run_level(
    url: str,
    images: list[bytes],
    concurrency: int,
    requests: int,
    seconds: float,
    params: dict | None = None,
    rounds: int = 1,
    raw=None,
    raw_seconds: float = 0.0,
) -> tuple[Level, list[float]]:
    """One concurrency level, in ``rounds`` parts; with ``raw`` (a raw-runner timer), each part is
    preceded by a raw timing, and one more follows the last: the ratio compares like with like even
    when the machine's load drifts. Returns the level and the raw timings."""
    latencies: list[float] = []
    errors, elapsed, counted, raws = 0, 0.0, 0, []
    s0, c0 = _batch_stats(url)
    for r in range(rounds):
        if raw is not None:
            raws.append(raw(raw_seconds))
        share = requests // rounds + (1 if r < requests % rounds else 0)
        lat, err, took, n = asyncio.run(
            _load(url, images, concurrency, share, seconds / rounds, warmup=concurrency, params=params or {})
        )
        latencies += lat
        errors += err
        elapsed += took
        counted += n
    if raw is not None:
        raws.append(raw(raw_seconds))
    s1, c1 = _batch_stats(url)
    # the batch statistics include the warm-up requests; they are few and alike
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    rps = counted / elapsed if elapsed > 0 else 0.0
    level = Level(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=elapsed,
        rps=rps,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        mean_batch=(s1 - s0) / (c1 - c0) if c1 > c0 else 0.0,
        ratio=rps / float(np.mean(raws)) if raws else 0.0,
    )
    return level, raws


# ------------------------------------------------------------------------------------------ the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start_server(settings, extra_args: list[str] | None = None, timeout: float = 600.0):
    """``attn-export serve`` on 127.0.0.1 in a child process; yields its URL."""
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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"loadtest: the server exited with status {proc.returncode}: {proc.stderr.read()}")
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


# ------------------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attn_export.serve.loadtest", description=__doc__.split("\n\n")[0])
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
    return p


def main(argv: list[str] | None = None) -> int:
    from attn_export.serve.loader import ModelError

    try:
        return _main(parser().parse_args(argv))
    except ModelError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from attn_export.serve.settings import Settings

    settings = Settings(
        model=args.model,
        backend=args.backend,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        threads=args.threads,
    )
    if settings.model is None:
        raise SystemExit("loadtest: no model: give MODEL (models/shapes_detector.onnx is not here)")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    images = sample_images(args.images)
    print(f"loadtest: {settings.model} on {settings.backend}, {len(images)} images, levels {levels}", file=sys.stderr)

    with contextlib.ExitStack() as stack:
        if args.url:
            check_loopback(args.url)
            url = args.url
        else:
            url = stack.enter_context(start_server(settings))
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
            machine=f"{os.cpu_count()} CPUs, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at start",
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
