"""The load test's client side: sample images, a light keep-alive HTTP/1.1 client, closed-loop load at one
concurrency (:func:`run_level`) and the service's Prometheus metrics, all on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass, field

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


def image_requests(url: str, images: list[bytes], params: dict | None = None) -> list[bytes]:
    """One ``POST /detect`` of each image, named ``0.jpg``, ``1.jpg``, ..."""
    return [build_request(url, params or {}, data, f"{i}.jpg") for i, data in enumerate(images)]


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


class Connection:
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


async def closed_loop(
    url: str, images: list[bytes], concurrency: int, requests: int, seconds: float, warmup: int, params: dict
):
    payloads = image_requests(url, images, params)
    latencies: list[float] = []
    errors = 0
    sent = 0
    conns = [Connection(url) for _ in range(concurrency)]

    async def post(conn: Connection, i: int) -> float:
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

    async def worker(conn: Connection) -> None:
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
    text = fetch_metrics(url, timeout=10)

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
            closed_loop(url, images, concurrency, share, seconds / rounds, warmup=concurrency, params=params or {})
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


# ------------------------------------------------------------------------------------------ metrics
def fetch_metrics(url: str, timeout: float = 30) -> str:
    """The text of the server's ``/metrics``."""
    import httpx

    return httpx.get(f"{url}/metrics", timeout=timeout).text


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (e.g. ``stage="decode"``)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        if not labels or labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else 0.0
