"""The load test's abuse scenarios: the server tried as a hostile user would, each part bounded in time.

``overload`` (closed-loop clients at several levels, a 503 making a client wait its Retry-After, with
``/healthz`` and ``/readyz`` probed meanwhile), ``slow`` (uploads dripping a byte at a time and connections
sending nothing, half a header, or the headers and 4 body bytes), ``memory`` (the server's RSS cold, warm,
at its peak during bursts of full-HD requests, and after), ``limits`` (20 images in a request, 16-bit
PNGs, clients that leave), ``grpc_memory`` (the same 19 MiB bodies from 40 concurrent clients over the
v2 HTTP binary extension and as gRPC ``ModelInfer`` messages: the server's RSS at its peak and 10 s after)
and ``hostage`` (clients declaring 20 MiB bodies and sending nothing or a byte a second, against one
normal client). :func:`abuse_report` writes their markdown tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
import time
import urllib.parse

import numpy as np

from attn_export.bench.load_client import (
    Connection,
    build_request,
    closed_loop,
    fetch_metrics,
    image_requests,
    metric,
    percentile_ms,
    sample_images,
)

SCENARIOS = ("overload", "slow", "memory", "limits", "grpc_memory", "hostage")


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
        conn = Connection(url)
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
        "p50_ms": percentile_ms(ok, 50),
        "p99_ms": percentile_ms(ok, 99),
        "max_ms": percentile_ms(ok, 100),
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
    payloads = image_requests(url, sample_images(8))
    rows = []
    for c in levels:
        before = fetch_metrics(url)
        with Prober(url) as probe:
            row = asyncio.run(_overload(url, payloads, c, seconds, seed=c))
        after = fetch_metrics(url)
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
        conn = Connection(url)
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
    return {"connections": results, "legit_ok": len(ok), "legit_other": other, "legit_p50_ms": percentile_ms(ok, 50)}


def scenario_slow(url: str, n_drip: int = 50, n_idle: int = 10, seconds: float = 40.0, interval: float = 0.5) -> dict:
    """``n_drip`` uploads sending one byte every ``interval`` s, and ``n_idle`` connections each sending nothing,
    part of the headers, or the headers and 4 body bytes; when the server cut each, within ``seconds``."""
    payloads = image_requests(url, sample_images(4))
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
    asyncio.run(closed_loop(url, sample_images(8), 8, warm_requests, 120.0, warmup=8, params={}))
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
            conn = Connection(url)
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


class RssSampler:
    """The peak RSS of process ``pid`` while the block runs (sampled every 20 ms in a thread)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak = _rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, _rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def noise_png(target_bytes: int, seed: int = 3) -> bytes:
    """A PNG of noise (it does not compress) of about ``target_bytes``: a big body that is a real image."""
    from PIL import Image

    side = int((target_bytes / 3) ** 0.5)
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def v2_binary_request(url: str, model: str, image: bytes) -> bytes:
    """One ``POST /v2/models/<model>/infer`` with the image as a binary BYTES element (the binary tensor
    extension: a JSON header, then the 4-byte length and the bytes), HTTP/1.1."""
    import json

    parts = urllib.parse.urlsplit(url)
    element = len(image).to_bytes(4, "little") + image
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(element)},
                }
            ]
        }
    ).encode()
    head = (
        f"POST {parts.path.rstrip('/')}/v2/models/{model}/infer HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(header) + len(element)}\r\n\r\n"
    ).encode()
    return head + header + element


def grpc_request(model: str, image: bytes) -> bytes:
    """A serialized ``ModelInferRequest`` with the image as its one BYTES element (``raw_input_contents``)."""
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
    return request.SerializeToString()


def _grpc_burst(port: int, data: bytes, clients: int, timeout: float = 120.0) -> list[str]:
    """``clients`` concurrent ``ModelInfer`` calls of ``data`` (serialized) on one channel; their status codes."""
    import concurrent.futures

    import grpc

    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        def one(_: int) -> str:
            try:
                call(data, timeout=timeout)
            except grpc.RpcError as e:
                return e.code().name
            return "OK"

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            return list(pool.map(one, range(clients)))


async def _http_burst(url: str, payload: bytes, clients: int, timeout: float = 120.0) -> list[str]:
    async def one() -> str:
        conn = Connection(url)
        try:
            status, _ = await asyncio.wait_for(conn.request(payload), timeout)
            return str(status)
        except Exception as e:  # a 503 sent while the body still arrives can reset the connection
            return type(e).__name__
        finally:
            await conn.close()

    return list(await asyncio.gather(*(one() for _ in range(clients))))


def scenario_grpc_memory(url: str, pid: int, grpc_port: int, clients: int = 40, body_mib: float = 19.0,
                         settle_s: float = 10.0, warm_requests: int = 200) -> dict:  # fmt: skip
    """The server's RSS cold, warm (``warm_requests`` small requests over HTTP and 50 over gRPC), at its peak
    while ``clients`` concurrent clients send one ``body_mib`` MiB image each (a PNG of noise) over the v2
    HTTP binary extension, ``settle_s`` after, and the same for the same bodies as gRPC ``ModelInfer``."""
    import httpx

    model = httpx.get(f"{url}/readyz", timeout=10).json()["model"]
    cold = _rss_mb(pid)
    asyncio.run(closed_loop(url, sample_images(8), 8, warm_requests, 120.0, warmup=8, params={}))
    small = grpc_request(model, sample_images(1)[0])
    for _ in range(5):
        _grpc_burst(grpc_port, small, 10)
    time.sleep(2.0)
    warm = _rss_mb(pid)
    image = noise_png(int(body_mib * (1 << 20)) - 256)
    out: dict = {"clients": clients, "body_bytes": len(image), "cold_mb": cold, "warm_mb": warm}
    bursts = (
        ("http", lambda: asyncio.run(_http_burst(url, v2_binary_request(url, model, image), clients))),
        ("grpc", lambda: _grpc_burst(grpc_port, grpc_request(model, image), clients)),
    )
    for name, burst in bursts:
        t0 = time.perf_counter()
        with RssSampler(pid) as rss:
            answers = burst()
        took = time.perf_counter() - t0
        time.sleep(settle_s)
        after = _rss_mb(pid)
        out[name] = {
            "peak_mb": rss.peak,
            "after_mb": after,
            "after_over_warm": after / warm if warm else 0.0,
            "answers": {a: answers.count(a) for a in sorted(set(answers))},
            "seconds": took,
        }
    out["hwm_mb"] = _rss_mb(pid, "VmHWM")
    print(f"  grpc_memory: {out}", file=sys.stderr)
    return out


async def _hostage(host: str, port: int, drip: bool, length: int, t_end: float, counts: dict) -> None:
    """A client that declares ``length`` body bytes and sends nothing, or a byte a second; it reconnects when cut."""
    head = f"POST /detect HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n"
    while time.perf_counter() < t_end:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        counts["connections"] += 1
        try:
            writer.write(head.encode())
            while time.perf_counter() < t_end:
                try:
                    chunk = await asyncio.wait_for(reader.read(4096), max(0.01, min(1.0, t_end - time.perf_counter())))
                except asyncio.TimeoutError:
                    if drip:
                        writer.write(b"x")
                        await writer.drain()
                    continue
                if chunk.startswith(b"HTTP/1.1 "):
                    status = chunk[9:12].decode()
                    counts[status] = counts.get(status, 0) + 1
                if not chunk:
                    counts["cut"] += 1
                    break
        except ConnectionError:
            counts["cut"] += 1
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _hostage_level(url: str, hostages: int, seconds: float, payloads: list[bytes], length: int) -> dict:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    t_end = time.perf_counter() + seconds
    counts: dict = {"connections": 0, "cut": 0}
    held: list[float] = []
    statuses: list[int] = []
    took: list[float] = []

    async def normal() -> None:  # one well-behaved client, once the hostages are in
        await asyncio.sleep(min(1.0, seconds / 4))
        conn = Connection(url)
        i = 0
        while time.perf_counter() < t_end - 0.5:
            t = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(conn.request(payloads[i % len(payloads)]), 30)
            except Exception:
                status = 0
                await conn.close()
                conn = Connection(url)
            statuses.append(status)
            took.append(time.perf_counter() - t)
            i += 1
            await asyncio.sleep(0.2)
        await conn.close()

    async def gauge() -> None:  # what the door holds meanwhile
        while time.perf_counter() < t_end:
            with contextlib.suppress(Exception):
                text = await asyncio.to_thread(fetch_metrics, url, 5)
                held.append(metric(text, "attn_export_body_bytes_in_flight"))
            await asyncio.sleep(0.5)

    clients = [_hostage(host, port, k % 2 == 1, length, t_end, counts) for k in range(hostages)]
    await asyncio.gather(*clients, normal(), gauge())
    ok = [t for s, t in zip(statuses, took, strict=True) if s == 200]
    return {
        "hostages": hostages,
        "declared_bytes": length,
        "seconds": seconds,
        "normal_sent": len(statuses),
        "normal_ok": len(ok),
        "normal_statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))},
        "normal_p50_ms": percentile_ms(ok, 50),
        "normal_max_ms": percentile_ms(ok, 100),
        "hostage_connections": counts["connections"],
        "hostage_answers": {k: v for k, v in counts.items() if k not in ("connections",)},
        "door_bytes_max_mb": max(held, default=0.0) / (1 << 20),
    }


def scenario_hostage(url: str, levels: list[int], seconds: float = 15.0, length: int | None = None) -> list[dict]:
    """At each level, that many clients declare a ``length``-byte body (default 20 MiB, the default largest) and
    send nothing (half of them) or a byte a second (the others), reconnecting when cut, while one normal
    client sends a small image every 0.2 s; one row per level."""
    length = length or 20 << 20  # the default max_body_bytes
    payloads = image_requests(url, sample_images(4))
    rows = []
    for n in levels:
        row = asyncio.run(_hostage_level(url, n, seconds, payloads, length))
        print(f"  hostage {n}: {row}", file=sys.stderr)
        rows.append(row)
        time.sleep(1.0)
    return rows


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
    before = fetch_metrics(url)
    payload = build_request(url, {}, sample_images(1)[0], "a.jpg")
    asyncio.run(_disconnecting(url, payload, n_waiting=12, n_reading=10))
    time.sleep(2.0)
    after = fetch_metrics(url)
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
    if "grpc_memory" in results:
        g = results["grpc_memory"]
        lines += [
            f"{g['clients']} concurrent clients, one {g['body_bytes'] / (1 << 20):.1f} MiB PNG each "
            f"(cold {g['cold_mb']:.0f} MB, warm {g['warm_mb']:.0f} MB):\n",
            "| protocol | peak MB | 10 s after MB | after / warm | answers | burst s |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for name, label in (("http", "v2 HTTP (binary extension)"), ("grpc", "gRPC ModelInfer")):
            r = g[name]
            answers = ", ".join(f"{k} x{v}" for k, v in r["answers"].items())
            lines.append(
                f"| {label} | {r['peak_mb']:.0f} | {r['after_mb']:.0f} | {r['after_over_warm']:.2f} | {answers} "
                f"| {r['seconds']:.1f} |"
            )
        lines.append("")
    if "hostage" in results:
        lines += [
            "| hostage clients | their connections | normal client: 200s / sent | its p50 / max ms "
            "| door reserved max MiB | hostages answered |",
            "|---:|---:|---|---|---:|---|",
        ]
        for r in results["hostage"]:
            answers = ", ".join(f"{k} x{v}" for k, v in r["hostage_answers"].items() if v)
            lines.append(
                f"| {r['hostages']} | {r['hostage_connections']} | {r['normal_ok']} / {r['normal_sent']} "
                f"| {r['normal_p50_ms']:.0f} / {r['normal_max_ms']:.0f} | {r['door_bytes_max_mb']:.1f} "
                f"| {answers or '-'} |"
            )
        lines.append("")
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
