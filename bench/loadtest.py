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

from attn_export.detection.loader import LoadOptions, default_model

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
            from attn_export.shapes.data import generate

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


# ------------------------------------------------------------------------------------------ HTTP load
def build_request(url: str, params: dict, data: bytes | list[bytes], name: str, ctype: str = "image/jpeg") -> bytes:
    """The bytes of one ``POST /detect`` with one multipart image, or several (HTTP/1.1, keep-alive)."""
    parts = urllib.parse.urlsplit(url)
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    boundary = "attn-export-loadtest-boundary"
    items = data if isinstance(data, list) else [data]
    names = [f"{i}-{name}" for i in range(len(items))] if isinstance(data, list) else [name]
    body = b"".join(
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{n}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        + one
        + b"\r\n"
        for n, one in zip(names, items, strict=True)
    )
    body += f"--{boundary}--\r\n".encode()
    head = (
        f"POST {parts.path.rstrip('/')}/detect{query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader, headers: dict | None = None) -> tuple[int, bytes, bool]:
    """``(status, body, keep_alive)`` of one HTTP/1.1 response (its headers into ``headers``)."""
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
        if headers is not None:
            headers[key] = value
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
        self.headers: dict[str, str] = {}  # of the last response

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        """One request; on a kept-alive connection that the server closed meanwhile (its keep-alive timeout),
        once more on a new one, as HTTP clients do."""
        reused = self.writer is not None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(payload)
            await self.writer.drain()
            self.headers = {}
            status, body, keep = await _read_response(self.reader, self.headers)
        except ConnectionError:
            await self.close()
            if reused:
                return await self.request(payload)
            raise
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


# ------------------------------------------------------------------------------------------ abuse
def hd_images(count: int = 16, seed: int = 11, size: tuple[int, int] = (1920, 1080)) -> list[bytes]:
    """Full-HD JPEGs (quality 90): shapes images scaled up, with sensor-like noise (so they weigh what photos do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for small in sample_images(count, seed):
        img = Image.open(io.BytesIO(small)).convert("RGB").resize(size, Image.Resampling.BILINEAR)
        arr = np.asarray(img, np.int16) + rng.normal(0, 6, (size[1], size[0], 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _metrics(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/metrics", timeout=30).text


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (e.g. ``stage="decode"``)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        if not labels or labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


class Prober:
    """A thread that asks ``/healthz`` and ``/readyz`` in turn every ``interval`` seconds (its own connection)
    and samples the backlog gauges from ``/metrics`` every ``metrics_every`` probes."""

    def __init__(self, url: str, interval: float = 0.05, metrics_every: int = 10) -> None:
        import threading

        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.interval = interval
        self.metrics_every = metrics_every
        self.latencies: dict[str, list[float]] = {"/healthz": [], "/readyz": []}
        self.failures = 0
        self.backlog: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _get(self, conn, path: str) -> tuple[int, bytes]:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()

    def _run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        n = 0
        while not self._stop.is_set() and n < 100_000:
            path = "/healthz" if n % 2 == 0 else "/readyz"
            t = time.perf_counter()
            try:
                status, _ = self._get(conn, path)
                if status != 200:
                    self.failures += 1
                self.latencies[path].append(time.perf_counter() - t)
                if n % self.metrics_every == 0:
                    _, text = self._get(conn, "/metrics")
                    self.backlog.append(metric(text.decode(), "attn_export_admitted_requests"))
            except Exception:
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            n += 1
            self._stop.wait(self.interval)
        conn.close()

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def summary(self) -> dict:
        out = {}
        for path, lat in self.latencies.items():
            ms = np.array(lat) * 1000 if lat else np.zeros(1)
            key = path.strip("/")
            out |= {
                f"{key}_p95_ms": float(np.percentile(ms, 95)),
                f"{key}_max_ms": float(ms.max()),
                f"{key}_n": len(lat),
            }
        return out | {"probe_failures": self.failures, "max_backlog": max(self.backlog, default=0.0)}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else 0.0


async def _overload(url: str, payloads: list[bytes], concurrency: int, seconds: float, seed: int) -> dict:
    """``concurrency`` clients, each sending back to back for ``seconds``; a 503 makes a client wait its
    Retry-After (times 1 to 1.5, the jitter of client libraries) before the next request."""
    import random

    rng = random.Random(seed)
    ok: list[float] = []
    counts = {"busy": 0, "other": 0, "errors": 0}
    retry_after: list[float] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def client(k: int) -> None:
        conn = _Connection(url)
        i = k
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(conn.request(payloads[i % len(payloads)]), 120)
            except Exception as e:
                counts["errors"] += 1
                kinds = counts.setdefault("error_kinds", {})
                kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                await conn.close()
                await asyncio.sleep(0.1)
                continue
            if status == 200:
                ok.append(time.perf_counter() - t)
            elif status == 503:
                counts["busy"] += 1
                wait = float(conn.headers.get("retry-after", "1") or 1)
                retry_after.append(wait)
                await asyncio.sleep(min(wait * rng.uniform(1.0, 1.5), max(0.0, deadline - time.perf_counter())))
            else:
                counts["other"] += 1
            i += concurrency
        await conn.close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {
        "clients": concurrency,
        "seconds": elapsed,
        "ok": len(ok),
        "ok_per_s": len(ok) / elapsed,
        "p50_ms": _pct(ok, 50),
        "p99_ms": _pct(ok, 99),
        "max_ms": _pct(ok, 100),
        "retry_after_median_s": float(np.median(retry_after)) if retry_after else 0.0,
        **counts,
    }


def _stage_means(before: str, after: str) -> dict:
    out = {}
    for family, stage in (("stage", "decode"), ("wait", "decode"), ("stage", "postprocess"), ("wait", "postprocess")):
        name = f"attn_export_{family}_seconds"
        label = f'stage="{stage}"'
        n = metric(after, f"{name}_count", label) - metric(before, f"{name}_count", label)
        total = metric(after, f"{name}_sum", label) - metric(before, f"{name}_sum", label)
        out[f"{stage}_{'work' if family == 'stage' else 'wait'}_mean_ms"] = 1000 * total / n if n else 0.0
    return out


def scenario_overload(url: str, levels: list[int], seconds: float) -> list[dict]:
    """Closed-loop clients at each level, with a prober on the probes; one row per level."""
    payloads = [build_request(url, {}, data, f"{i}.jpg") for i, data in enumerate(sample_images(8))]
    rows = []
    for c in levels:
        before = _metrics(url)
        with Prober(url) as probe:
            row = asyncio.run(_overload(url, payloads, c, seconds, seed=c))
        after = _metrics(url)
        shed = metric(after, "attn_export_shed_requests_total") - metric(before, "attn_export_shed_requests_total")
        row |= probe.summary() | _stage_means(before, after) | {"shed_counted": shed}
        rows.append(row)
        print(f"  overload {c}: {row}", file=sys.stderr)
        time.sleep(2)
    return rows


async def _slow_connection(host: str, port: int, kind: str, seconds: float, interval: float) -> dict:
    """One abusive connection; when (if) the server closed it, and what it answered."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST /detect HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
    if kind == "partial":
        writer.write(head.encode())
    elif kind == "body4":
        writer.write(f"{head}Content-Length: 1000\r\n\r\nabcd".encode())
    elif kind == "drip":
        writer.write(f"{head}Content-Length: 100000\r\n\r\n".encode())
    answer = b""

    async def drip() -> None:
        while kind == "drip":
            await asyncio.sleep(interval)
            writer.write(b"x")
            await writer.drain()

    dripper = asyncio.ensure_future(drip())
    closed_at = None
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(4096), max(0.01, seconds - (time.perf_counter() - t0)))
            if not chunk:
                closed_at = time.perf_counter() - t0
                break
            answer += chunk
    except (asyncio.TimeoutError, ConnectionError):
        if not isinstance(answer, bytes) or time.perf_counter() - t0 < seconds - 0.05:
            closed_at = time.perf_counter() - t0
    finally:
        dripper.cancel()
        with contextlib.suppress(BaseException):
            await dripper
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else ("closed" if closed_at else "open")
    return {"kind": kind, "closed_at": closed_at, "answer": status}


async def _slow(url: str, n_drip: int, n_idle: int, seconds: float, interval: float, payloads: list[bytes]) -> dict:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    kinds = ["drip"] * n_drip + ["nothing", "partial", "body4"] * n_idle
    conns = [_slow_connection(host, port, k, seconds, interval) for k in kinds]
    ok: list[float] = []
    other = 0

    async def legit() -> None:  # one well-behaved client meanwhile
        nonlocal other
        conn = _Connection(url)
        t_end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            try:
                status, _ = await conn.request(payloads[i % len(payloads)])
            except Exception:
                status = 0
            if status == 200:
                ok.append(time.perf_counter() - t)
            else:
                other += 1
            i += 1
            await asyncio.sleep(0.2)
        await conn.close()

    results, _ = await asyncio.gather(asyncio.gather(*conns), legit())
    return {"connections": results, "legit_ok": len(ok), "legit_other": other, "legit_p50_ms": _pct(ok, 50)}


def scenario_slow(url: str, n_drip: int = 50, n_idle: int = 10, seconds: float = 40.0, interval: float = 0.5) -> dict:
    """``n_drip`` uploads sending one byte every ``interval`` s, and ``n_idle`` connections each sending nothing,
    part of the headers, or the headers and 4 body bytes; when the server cut each, within ``seconds``."""
    payloads = [build_request(url, {}, data, f"{i}.jpg") for i, data in enumerate(sample_images(4))]
    with Prober(url) as probe:
        out = asyncio.run(_slow(url, n_drip, n_idle, seconds, interval, payloads))
    rows = []
    for kind in ("drip", "nothing", "partial", "body4"):
        mine = [c for c in out["connections"] if c["kind"] == kind]
        closed = [c["closed_at"] for c in mine if c["closed_at"] is not None]
        answers = sorted({c["answer"] for c in mine})
        rows.append(
            {
                "kind": kind,
                "connections": len(mine),
                "open_at_20s": sum(1 for c in mine if c["closed_at"] is None or c["closed_at"] > 20),
                "open_at_end": len(mine) - len(closed),
                "closed_after_s_min": min(closed, default=0.0),
                "closed_after_s_max": max(closed, default=0.0),
                "answers": "/".join(answers),
            }
        )
    summary = {"rows": rows, "seconds": seconds} | {k: v for k, v in out.items() if k != "connections"}
    summary |= probe.summary()
    print(f"  slow: {summary}", file=sys.stderr)
    return summary


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def scenario_memory(url: str, pid: int, concurrency: int = 12, per_request: int = 16, bursts: int = 3,
                    warm_requests: int = 200, settle_s: float = 10.0) -> dict:  # fmt: skip
    """RSS of the server process: cold, warm (after ``warm_requests`` one-image requests), its peak during
    ``bursts`` bursts of ``concurrency`` requests of ``per_request`` full-HD JPEGs, and ``settle_s`` after."""
    import threading

    cold = _rss_mb(pid)
    asyncio.run(_load(url, sample_images(8), 8, warm_requests, 120.0, warmup=8, params={}))
    time.sleep(2.0)
    warm = _rss_mb(pid)
    images = hd_images(per_request)
    payload = build_request(url, {}, images, "hd.jpg")
    peak = [warm]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], _rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    statuses: list[int] = []
    took: list[float] = []

    async def burst() -> None:
        async def one() -> None:
            conn = _Connection(url)
            t = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(conn.request(payload), 300)
            except Exception:
                status = 0
            statuses.append(status)
            took.append(time.perf_counter() - t)
            await conn.close()

        await asyncio.gather(*(one() for _ in range(concurrency)))

    for _ in range(bursts):
        asyncio.run(burst())
    stop.set()
    sampler.join()
    time.sleep(settle_s)
    after = _rss_mb(pid)
    out = {
        "burst_clients": concurrency,
        "image_bytes_mean": float(np.mean([len(b) for b in images])),
        "request_bytes": len(payload),
        "cold_mb": cold,
        "warm_mb": warm,
        "peak_mb": max(peak[0], 0.0),
        "hwm_mb": _rss_mb(pid, "VmHWM"),
        "after_mb": after,
        "after_over_warm": after / warm if warm else 0.0,
        "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))},
        "burst_request_p50_s": float(np.median(took)) if took else 0.0,
    }
    print(f"  memory: {out}", file=sys.stderr)
    return out


def _grey16_png(arr8: np.ndarray) -> bytes:
    """The grey version of an 8-bit image as a 16-bit PNG (values x 257: the same picture)."""
    import struct
    import zlib

    grey = np.rint(arr8 @ np.array([0.299, 0.587, 0.114])).astype(np.uint16) * 257
    h, w = grey.shape
    raw = b"".join(b"\0" + grey[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


async def _disconnecting(url: str, payload: bytes, n_waiting: int, n_reading: int) -> None:
    parts = urllib.parse.urlsplit(url)

    async def one(cut: bool) -> None:
        _, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        writer.write(payload[: len(payload) // 2] if cut else payload)
        await writer.drain()
        await asyncio.sleep(0.3 if cut else 0.02)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    # in two waves, each within the door's places (16 by default on a CPU), so none is answered 503
    await asyncio.gather(*(one(True) for _ in range(n_reading)))
    await asyncio.sleep(0.5)
    await asyncio.gather(*(one(False) for _ in range(n_waiting)))


def scenario_limits(url: str) -> dict:
    """The documented limits and decoding: 20 images in one request, 16-bit grey PNGs against their 8-bit
    versions, and clients that leave (how the metrics count them)."""
    import httpx
    from PIL import Image

    out: dict = {}
    small = sample_images(20)
    r = httpx.post(f"{url}/detect", files=[("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(small)])
    out["twenty_images"] = f"{r.status_code} {r.json().get('error')}: {r.json().get('detail')}"
    rows = []
    for i, data in enumerate(sample_images(3, seed=5)):
        arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
        grey8 = np.rint(arr @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(grey8, "L").save(buf, format="PNG")
        found = []
        for blob in (buf.getvalue(), _grey16_png(arr)):
            body = httpx.post(f"{url}/detect", files={"images": (f"{i}.png", blob, "image/png")}, timeout=60).json()
            found.append(len(body["images"][0]["detections"]))
        rows.append({"image": i, "detections_8bit": found[0], "detections_16bit": found[1]})
    out["png16"] = rows
    before = _metrics(url)
    payload = build_request(url, {}, sample_images(1)[0], "a.jpg")
    asyncio.run(_disconnecting(url, payload, n_waiting=12, n_reading=10))
    time.sleep(2.0)
    after = _metrics(url)
    delta = lambda name, labels="": metric(after, name, labels) - metric(before, name, labels)  # noqa: E731
    out["disconnects"] = {
        "sent_waiting": 12,
        "sent_reading": 10,
        "counted_waiting": delta("attn_export_client_disconnects_total", 'stage="waiting"'),
        "counted_reading": delta("attn_export_client_disconnects_total", 'stage="reading"'),
        "counted_as_400": delta("attn_export_http_requests_total", 'status="400"'),
        "answered_200": delta("attn_export_http_requests_total", 'route="/detect",status="200"'),
        "answered_503": delta("attn_export_http_requests_total", 'route="/detect",status="503"'),
    }
    print(f"  limits: {out}", file=sys.stderr)
    return out


def abuse_report(results: dict) -> str:
    """Markdown tables of the abuse scenarios."""
    lines = []
    if "overload" in results:
        lines += [
            "| clients | 200s | 200/s | p50 ms | p99 ms | 503s | other / errors | median Retry-After s "
            "| healthz p95 / max ms | readyz p95 / max ms | max backlog | postprocess work / wait ms |",
            "|---:|---:|---:|---:|---:|---:|---|---:|---|---|---:|---|",
        ]
        for r in results["overload"]:
            lines.append(
                f"| {r['clients']} | {r['ok']} | {r['ok_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
                f"| {r['busy']} | {r['other']} / {r['errors']} | {r['retry_after_median_s']:.0f} "
                f"| {r['healthz_p95_ms']:.1f} / {r['healthz_max_ms']:.0f} "
                f"| {r['readyz_p95_ms']:.1f} / {r['readyz_max_ms']:.0f} | {r['max_backlog']:.0f} "
                f"| {r['postprocess_work_mean_ms']:.1f} / {r['postprocess_wait_mean_ms']:.1f} |"
            )
        lines.append("")
    if "slow" in results:
        sl = results["slow"]
        lines += [
            "| connection | count | open at 20 s | open at the end | cut after (s) | answer |",
            "|---|---:|---:|---:|---|---|",
        ]
        for r in sl["rows"]:
            lines.append(
                f"| {r['kind']} | {r['connections']} | {r['open_at_20s']} | {r['open_at_end']} "
                f"| {r['closed_after_s_min']:.1f} to {r['closed_after_s_max']:.1f} | {r['answers']} |"
            )
        lines.append(
            f"\nMeanwhile ({sl['seconds']:.0f} s): one client's requests {sl['legit_ok']} answered (p50 "
            f"{sl['legit_p50_ms']:.0f} ms), {sl['legit_other']} not; healthz p95 {sl['healthz_p95_ms']:.1f} ms, "
            f"max {sl['healthz_max_ms']:.0f} ms.\n"
        )
    if "memory" in results:
        m = results["memory"]
        lines += [
            "| burst | cold MB | warm MB | peak MB | 10 s after MB | after / warm | burst answers | burst p50 s |",
            "|---|---:|---:|---:|---:|---:|---|---:|",
            f"| {m['burst_clients']} x 16 full-HD JPEGs | {m['cold_mb']:.0f} | {m['warm_mb']:.0f} "
            f"| {max(m['peak_mb'], m['hwm_mb']):.0f} | {m['after_mb']:.0f} "
            f"| {m['after_over_warm']:.2f} | {m['statuses']} | {m['burst_request_p50_s']:.1f} |",
            "",
        ]
    if "limits" in results:
        lim = results["limits"]
        lines.append(f"20 images: {lim['twenty_images']}\n")
        lines.append("| image | detections, 8-bit grey PNG | detections, 16-bit grey PNG |")
        lines.append("|---:|---:|---:|")
        lines += [f"| {r['image']} | {r['detections_8bit']} | {r['detections_16bit']} |" for r in lim["png16"]]
        d = lim["disconnects"]
        lines.append(
            f"\nDisconnects: {d['sent_waiting']} clients left while waiting, {d['sent_reading']} mid-body; counted "
            f"{d['counted_waiting']:.0f} and {d['counted_reading']:.0f} as disconnects, {d['counted_as_400']:.0f} as "
            f"HTTP 400 ({d['answered_503']:.0f} were answered 503 at the door, {d['answered_200']:.0f} 200, "
            "before they left)."
        )
    return "\n".join(lines)


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
    g = p.add_argument_group("abuse scenarios (--scenario abuse, or some of overload,slow,memory,limits)")
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
    g.add_argument("--pid", type=int, help="with --url: the server's process id (for its memory)")
    g.add_argument("--server-arg", action="append", default=[], help="an extra option of the server started")
    return p


SCENARIOS = ("overload", "slow", "memory", "limits")


def _abuse(args: argparse.Namespace, settings) -> int:
    wanted = SCENARIOS if args.scenario == "abuse" else tuple(x.strip() for x in args.scenario.split(","))
    unknown = [w for w in wanted if w not in SCENARIOS]
    if unknown:
        raise SystemExit(f"loadtest: unknown scenario {unknown}; choose from throughput, abuse, {', '.join(SCENARIOS)}")
    results: dict = {
        "machine": f"{os.cpu_count()} CPUs, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at start"
    }
    with contextlib.ExitStack() as stack:
        pids: list[int] = []
        if args.url:
            check_loopback(args.url)
            url = args.url
            if args.pid:
                pids.append(args.pid)
        else:
            url = stack.enter_context(start_server(settings, args.server_arg, pids=pids))
        if "limits" in wanted:
            results["limits"] = scenario_limits(url)
        if "memory" in wanted:
            if not pids:
                raise SystemExit("loadtest: the memory scenario needs the server's --pid with --url")
            results["memory"] = scenario_memory(url, pids[0], concurrency=args.burst_clients, bursts=args.bursts)
        if "overload" in wanted:
            levels = [int(c) for c in args.overload_levels.split(",") if c.strip()]
            results["overload"] = scenario_overload(url, levels, args.overload_seconds)
        if "slow" in wanted:
            results["slow"] = scenario_slow(url, args.slow_clients, args.idle_clients, args.slow_seconds)
    print(f"model {settings.model} on {settings.backend}; {results['machine']}")
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
        if args.url:
            check_loopback(args.url)
            url = args.url
        else:
            url = stack.enter_context(start_server(settings, args.server_arg))
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
