"""The service under abuse: the door's bounds (503 + Retry-After before the body is read), read timeouts,
disconnects counted apart, every refusal counted, and the probes answering while the model is busy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import LiveServer, cell_square, client_for, make_image, make_settings

from attn_export.serve.door import (
    AdmissionMiddleware,
    Busy,
    Door,
    RateMeter,
    Ticket,
    protocol_with_header_timeout,
    release_memory,
)
from attn_export.serve.metrics import ServeMetrics


def _metric(text: str, name: str, labels: str = "") -> float:
    found = re.findall(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in found)


def _png(data=None, name="a.png"):
    return {"images": (name, data if data is not None else make_image(), "image/png")}


class Gate:
    """Holds every inference call until opened; ``entered`` is set once a call waits."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()

    def loader(self, settings):
        from attn_export.detection.loader import load

        model = load(settings)
        fast = model.infer

        def infer(batch):
            self.entered.set()
            self.open.wait(20)
            return fast(batch)

        model.infer = infer
        return model


# ------------------------------------------------------------------------------------------ the door, alone
def test_rate_meter_and_retry_after():
    meter = RateMeter(window_s=10.0)
    door = Door(max_requests=4, max_bytes=1000, max_pixels=100, meter=meter)
    assert door.retry_after(0) == 1 and door.retry_after(3) == 5  # nothing observed yet
    for i in range(20):  # 20 answers over 2 s: 10 per second
        meter.record(100.0 + i * 0.1)
    assert meter.rate(102.0) == pytest.approx(10.0, rel=0.06)
    meter2 = RateMeter(window_s=10.0)
    for i in range(20):
        meter2.record(time.monotonic() - 2.0 + i * 0.1)
    door2 = Door(4, 1000, 100, max_retry_after_s=60, meter=meter2)
    assert door2.retry_after(30) == pytest.approx(3, abs=1)  # 30 waiting at ~10/s
    assert door2.retry_after(1000) == 60  # capped
    assert meter.rate(200.0) is None  # the window forgot them


def test_door_bounds_requests_bytes_and_pixels():
    door = Door(max_requests=2, max_bytes=1000, max_pixels=100)
    a = door.admit(600)
    with pytest.raises(Busy) as e:
        door.admit(500)
    assert e.value.reason == "bytes" and e.value.retry_after >= 1
    b = door.admit(300)
    slow = door.admit(50)  # a slow body holds bytes, not a request place
    assert (door.reading, door.requests) == (3, 0)
    a.start()
    b.start()
    with pytest.raises(Busy) as e:
        door.admit(0)
    assert e.value.reason == "in_flight" and "2 requests are in flight" in e.value.message
    with pytest.raises(Busy):
        slow.start()  # its body arrived, but the places were taken meanwhile
    slow.release()
    a.reserve_pixels(80)
    with pytest.raises(Busy) as e:
        b.reserve_pixels(30)
    assert e.value.reason == "pixels"
    a.release_pixels()
    b.reserve_pixels(30)
    a.release()
    a.release()  # once only
    b.release()
    assert (door.requests, door.bytes, door.pixels) == (0, 0, 0)
    # alone, a request larger than a budget still runs (each image is within max_pixels)
    big = door.admit(5000)
    big.start()
    big.reserve_pixels(500)
    big.release()
    assert (door.requests, door.reading, door.bytes, door.pixels) == (0, 0, 0, 0)


def _call(mw, scope, receive):
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    return sent


def _scope(length: int | None = None):
    headers = [(b"content-type", b"image/png")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": "/detect", "headers": headers}


@pytest.mark.parametrize(
    ("max_requests", "held_bytes", "length", "reason"), [(1, 0, 10, "in_flight"), (4, 900, 200, "bytes")]
)
def test_the_door_answers_503_before_reading_the_body(max_requests, held_bytes, length, reason):
    door = Door(max_requests=max_requests, max_bytes=1000, max_pixels=100)
    tickets = [door.admit(held_bytes)]
    tickets[0].start()
    metrics = ServeMetrics()

    async def app(scope, receive, send):  # pragma: no cover - must not run
        raise AssertionError("the app ran")

    async def receive():  # pragma: no cover - must not be called
        raise AssertionError("the body was read")

    mw = AdmissionMiddleware(app, door, max_body_bytes=10_000, body_timeout_s=5, metrics=metrics)
    start, body = _call(mw, _scope(length), receive)
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert int(headers[b"retry-after"]) >= 1 and b'"error": "busy"' in body["body"]
    assert _metric(metrics.render().decode(), "attn_export_shed_requests_total", f'{{reason="{reason}"}}') == 1
    for t in tickets:
        t.release()


def test_the_door_lets_gets_through_at_any_load():
    door = Door(max_requests=1, max_bytes=1000, max_pixels=100)
    door.admit(0).start()
    ran = []

    async def app(scope, receive, send):
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = AdmissionMiddleware(app, door, max_body_bytes=10_000, body_timeout_s=5)
    sent = _call(mw, {"type": "http", "method": "GET", "path": "/healthz", "headers": []}, None)
    assert sent[0]["status"] == 200 and ran == ["/healthz"]


def test_release_memory_runs_on_glibc():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert release_memory() is True


# ------------------------------------------------------------------------------------------ a live server
def test_busy_server_sheds_at_once_and_probes_stay_fast(standin_onnx):
    from attn_export.serve.app import create_app

    gate = Gate()
    settings = make_settings(standin_onnx, warmup=False, max_in_flight=1, max_wait_ms=0.0)
    app = create_app(settings, loader=gate.loader)
    with LiveServer(app) as server, concurrent.futures.ThreadPoolExecutor(1) as pool:
        img = make_image((320, 320), [cell_square(0, 1, 1)])
        first = pool.submit(httpx.post, f"{server.url}/detect", files=_png(img), timeout=30)
        assert gate.entered.wait(10)
        t0 = time.perf_counter()
        r = httpx.post(f"{server.url}/detect", files=_png(img), timeout=30)
        took = time.perf_counter() - t0
        assert r.status_code == 503 and r.json()["error"] == "busy", r.text
        assert int(r.headers["retry-after"]) >= 1 and took < 2.0
        for path in ("/healthz", "/readyz", "/metrics"):
            t0 = time.perf_counter()
            assert httpx.get(f"{server.url}{path}", timeout=5).status_code == 200
            assert time.perf_counter() - t0 < 1.0
        text = httpx.get(f"{server.url}/metrics").text
        assert _metric(text, "attn_export_admitted_requests") == 1  # the backlog is visible
        assert _metric(text, "attn_export_shed_requests_total", '{reason="in_flight"}') == 1
        assert _metric(text, "attn_export_http_requests_total", '{method="POST",route="/detect",status="503"}') == 1
        gate.open.set()
        ok = first.result(timeout=30)
        assert ok.status_code == 200 and ok.json()["images"][0]["detections"][0]["class_id"] == 0
        text = httpx.get(f"{server.url}/metrics").text
        assert _metric(text, "attn_export_admitted_requests") == 0
        assert _metric(text, "attn_export_wait_seconds_count", '{stage="decode"}') == 1
        assert _metric(text, "attn_export_wait_seconds_count", '{stage="postprocess"}') == 1


def test_pixels_in_flight_are_bounded(standin_onnx):
    # 320 x 320 = 102,400 pixels per image; a budget of 150,000 takes one image at a time
    gate = Gate()
    settings = make_settings(standin_onnx, warmup=False, max_pixels_in_flight=150_000, max_wait_ms=0.0)
    with client_for(settings, loader=gate.loader) as c:
        svc = c.app.state.service
        ticket = svc.door.admit(0)
        ticket.start()
        ticket.reserve_pixels(100_000)  # another request decoding
        r = c.post("/detect", files=_png())
        assert r.status_code == 503 and r.json()["error"] == "busy" and "megapixels" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        ticket.release()
        gate.open.set()
        assert c.post("/detect", files=_png()).status_code == 200
        assert svc.door.pixels == 0 and svc.door.requests == 0


def test_v2_infer_goes_through_the_same_pixel_budget(standin_onnx):
    """/v2 infer (serve/v2_http.py) reserves its images' pixels on the door like /detect: 503 in the protocol's
    form with Retry-After past the budget, and nothing left reserved afterwards."""
    import base64

    gate = Gate()
    settings = make_settings(standin_onnx, warmup=False, max_pixels_in_flight=150_000, max_wait_ms=0.0)
    with client_for(settings, loader=gate.loader) as c:
        svc = c.app.state.service
        name = svc.model.name
        data = base64.b64encode(make_image()).decode()
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [data]}]}
        ticket = svc.door.admit(0)
        ticket.start()
        ticket.reserve_pixels(100_000)  # another request decoding
        r = c.post(f"/v2/models/{name}/infer", json=body)
        assert r.status_code == 503 and "megapixels" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        ticket.release()
        gate.open.set()
        r = c.post(f"/v2/models/{name}/infer", json=body)
        assert r.status_code == 200, r.text
        assert {o["name"] for o in r.json()["outputs"]} >= {"num_detections", "detection_boxes"}
        assert svc.door.pixels == 0 and svc.door.requests == 0


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def strict_server(standin_onnx):
    """A live server with 1 s header and body timeouts (and its app, to read its metrics)."""
    from attn_export.serve.app import create_app

    settings = make_settings(standin_onnx, warmup=False, header_timeout_s=1.0, body_timeout_s=1.0)
    app = create_app(settings)
    closed = app.state.service.metrics.connections_closed
    http = protocol_with_header_timeout(settings.header_timeout_s, lambda reason: closed.labels(reason).inc())
    with LiveServer(app, http=http, timeout_keep_alive=1) as server:
        yield server


def test_idle_and_partial_headers_are_cut(strict_server):
    before = httpx.get(f"{strict_server.url}/metrics").text
    idle = _raw(strict_server.port)
    partial = _raw(strict_server.port)
    partial.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Ty")
    t0 = time.monotonic()
    assert _read_all(idle) == b""
    assert _read_all(partial).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < 5
    after = httpx.get(f"{strict_server.url}/metrics").text
    for reason in ("idle", "headers"):
        key = "attn_export_connections_closed_total"
        assert _metric(after, key, f'{{reason="{reason}"}}') - _metric(before, key, f'{{reason="{reason}"}}') >= 1


def test_slow_body_is_cut_with_408(strict_server):
    before = httpx.get(f"{strict_server.url}/metrics").text
    s = _raw(strict_server.port)
    s.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nabcd")
    stop = threading.Event()

    def drip():  # one byte every 0.2 s: never done within the 1 s deadline
        while not stop.wait(0.2):
            try:
                s.sendall(b"x")
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    t0 = time.monotonic()
    answer = _read_all(s)
    stop.set()
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert 0.8 < time.monotonic() - t0 < 5
    after = httpx.get(f"{strict_server.url}/metrics").text
    key = "attn_export_rejected_inputs_total"
    assert _metric(after, key, '{reason="body_timeout"}') - _metric(before, key, '{reason="body_timeout"}') == 1
    # and the server goes on answering
    r = httpx.post(f"{strict_server.url}/detect", files=_png(make_image((320, 320), [cell_square(2, 0, 0)])))
    assert r.status_code == 200 and r.json()["images"][0]["detections"][0]["class_id"] == 2


def test_disconnects_are_counted_apart_from_statuses(standin_onnx):
    from attn_export.serve.app import create_app

    gate = Gate()
    settings = make_settings(standin_onnx, warmup=False, max_wait_ms=0.0)
    with LiveServer(create_app(settings, loader=gate.loader)) as server:
        req = httpx.Request("POST", f"{server.url}/detect", files=_png())
        head = f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Length: {len(req.read())}\r\n"
        head += f"Content-Type: {req.headers['content-type']}\r\n\r\n"
        # 1: leaves while the model runs
        s = _raw(server.port)
        s.sendall(head.encode() + req.read())
        assert gate.entered.wait(10)
        s.close()
        # 2: leaves in the middle of the body
        s = _raw(server.port)
        s.sendall(head.encode() + req.read()[:50])
        time.sleep(0.2)
        s.close()
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"{server.url}/metrics").text
            got = [
                _metric(text, "attn_export_client_disconnects_total", f'{{stage="{s}"}}')
                for s in ("waiting", "reading")
            ]
            if got == [1, 1] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert got == [1, 1], text
        assert _metric(text, "attn_export_http_requests_total", '{method="POST",route="/detect",status="400"}') == 0
        assert "/detect" not in "".join(re.findall(r"^attn_export_http_requests_total.*$", text, re.M))
        assert _metric(text, "attn_export_admitted_requests") == 0
        gate.open.set()
        r = httpx.post(f"{server.url}/detect", files=_png(make_image((320, 320), [cell_square(1, 2, 2)])), timeout=30)
        assert r.status_code == 200 and r.json()["images"][0]["detections"][0]["class_id"] == 1


# ------------------------------------------------------------------------------------------ limits and counters
@pytest.mark.parametrize("count", [17, 20, 100])
def test_too_many_images_is_413_at_any_count(client, count):
    files = [("images", (f"{i}.png", make_image((32, 32)), "image/png")) for i in range(count)]
    r = client.post("/detect", files=files)
    assert r.status_code == 413 and r.json()["error"] == "too_many_images", r.text
    assert "at most 16" in r.json()["detail"]


def test_every_refusal_is_counted(client):
    def counts():
        text = client.get("/metrics").text
        return {
            reason: _metric(text, "attn_export_rejected_inputs_total", f'{{reason="{reason}"}}')
            for reason in ("bad_request", "no_image", "too_many_images", "unsupported_media_type", "body_size")
        }

    before = counts()
    broken = {"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}
    assert client.post("/detect", **broken).status_code == 400
    no_boundary = {"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data"}}
    assert client.post("/detect", **no_boundary).status_code == 400
    text_only = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\nhi\r\n--b--\r\n'
    assert (
        client.post("/detect", content=text_only, headers={"content-type": "multipart/form-data; boundary=b"}).json()[
            "error"
        ]
        == "no_image"
    )
    assert (
        client.post("/detect", files=[("images", ("a.png", make_image((8, 8)), "image/png"))] * 18).status_code == 413
    )
    assert client.post("/detect", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
    limit = client.app.state.service.settings.max_body_bytes
    assert client.post("/detect", content=bytes(limit + 1), headers={"content-type": "image/png"}).status_code == 413
    after = counts()
    assert {k: after[k] - before[k] for k in after} == {
        "bad_request": 2,
        "no_image": 1,
        "too_many_images": 1,
        "unsupported_media_type": 1,
        "body_size": 1,
    }


def test_timings_separate_waiting_from_working(client):
    r = client.post("/detect", files=_png(make_image((320, 320), [cell_square(0, 3, 3)])))
    t = r.json()["timings"]
    assert set(t) == {
        "decode_ms", "decode_wait_ms", "queue_ms", "inference_ms", "postprocess_wait_ms", "postprocess_ms", "total_ms"
    }  # fmt: skip
    assert all(v >= 0 for v in t.values())
    parts = sum(v for k, v in t.items() if k != "total_ms")
    assert parts <= t["total_ms"] * 1.05 + 1.0
    names = [p.split(";")[0].strip() for p in r.headers["server-timing"].split(",")]
    assert names == ["decode", "decode_wait", "queue", "inference", "postprocess_wait", "postprocess", "total"]


def test_a_slow_body_holds_no_request_place(standin_onnx):
    """With one place at the door, a client still sending its body does not keep others out."""
    from attn_export.serve.app import create_app

    settings = make_settings(standin_onnx, warmup=False, max_in_flight=1, body_timeout_s=20.0)
    with LiveServer(create_app(settings)) as server:
        slow = _raw(server.port)
        slow.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\nab")
        time.sleep(0.2)
        text = httpx.get(f"{server.url}/metrics").text
        assert (
            _metric(text, "attn_export_reading_requests") == 1 and _metric(text, "attn_export_admitted_requests") == 0
        )
        img = make_image((320, 320), [cell_square(1, 4, 4)])
        r = httpx.post(f"{server.url}/detect", files=_png(img), timeout=30)
        assert r.status_code == 200 and r.json()["images"][0]["detections"][0]["class_id"] == 1
        slow.close()


def test_header_timeout_on_h11_too(standin_onnx):
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from attn_export.serve.app import create_app

    app = create_app(make_settings(standin_onnx, warmup=False))
    cut = []
    with LiveServer(app, http=protocol_with_header_timeout(0.5, cut.append, base=H11Protocol)) as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # a whole request in time is served
        idle, partial = _raw(server.port), _raw(server.port)
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert _read_all(idle) == b""
        assert _read_all(partial).startswith(b"HTTP/1.1 408")
    assert sorted(cut) == ["headers", "idle"]


def test_cli_options_reach_the_settings():
    from attn_export.serve.cli import parser, settings_from_args, settings_to_env

    args = ["m.onnx", "--max-in-flight", "3", "--max-bytes-in-flight", "5000", "--max-pixels-in-flight", "7"]
    args += ["--header-timeout-s", "2.5", "--body-timeout-s", "4"]
    s = settings_from_args(parser().parse_args(args))
    assert (s.max_in_flight, s.max_bytes_in_flight, s.max_pixels_in_flight) == (3, 5000, 7)
    assert (s.header_timeout_s, s.body_timeout_s) == (2.5, 4.0)
    env = settings_to_env(s)  # what worker processes read (the header timeout among them)
    assert env["ATTN_EXPORT_HEADER_TIMEOUT_S"] == "2.5" and env["ATTN_EXPORT_MAX_IN_FLIGHT"] == "3"


# ------------------------------------------------------------------------------------------ the byte budget
MiB = 1 << 20


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_budget_fills_with_bytes_not_promises():
    """Eight bodies declaring 20 MiB hold the whole 160 MiB only while they arrive on pace: one that sends
    nothing, or a byte a second, gives its reservation up to the next request that needs it."""
    clock = FakeClock()
    door = Door(max_requests=64, max_bytes=160 * MiB, max_pixels=100, pace_s=30.0, grace_s=0.25, clock=clock)
    hostages = [door.admit(20 * MiB) for _ in range(8)]
    with pytest.raises(Busy) as e:  # within their grace: the newcomer is told how long until they lapse
        door.admit(MiB)
    assert e.value.reason == "bytes" and e.value.wait_s == pytest.approx(0.25)
    for _ in range(5):
        clock.t += 1.0
        for h in hostages[:4]:
            h.received(1)
        normal = door.admit(MiB)
        normal.received(MiB)
        normal.start()
        door.leave(normal, answered=True)
    assert door.reclaimed == 1  # only what was needed: one reservation made room for all five
    big = door.admit(100 * MiB)  # needs five more; the drippers' byte a second keeps none of theirs
    assert door.reclaimed == 6 and sum(h.reclaimed for h in hostages[:4]) >= 2
    assert door.bytes == sum(h.bytes for h in hostages) + big.bytes and door.bytes <= door.max_bytes
    big.release()
    # a reclaimed body goes on, charged as it arrives, while there is room
    h = next(h for h in hostages if h.reclaimed)
    h.received(2 * MiB)
    assert h.bytes == h.arrived
    for t in hostages:
        t.release()
    assert (door.bytes, door.reading, door.requests) == (0, 0, 0)


def test_a_body_on_pace_keeps_its_reservation():
    """A body arriving at its share of the deadline is not reclaimed; when the budget is full of such bodies
    (real uploads), a newcomer gets 503 at once (no wait: nothing in the way lapses soon)."""
    clock = FakeClock()
    door = Door(max_requests=64, max_bytes=100 * MiB, max_pixels=100, pace_s=10.0, grace_s=0.25, clock=clock)
    uploads = [door.admit(50 * MiB) for _ in range(2)]
    for _ in range(4):
        clock.t += 1.0
        for u in uploads:
            u.received(6 * MiB)  # 6 MiB/s: ahead of 50 MiB in 10 s
        with pytest.raises(Busy) as e:
            door.admit(MiB)
        assert e.value.wait_s is None
    assert door.reclaimed == 0 and door.bytes == 100 * MiB


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_door_accounting_random_walk(seed):
    """Random admissions, arrivals, clock steps, starts and releases against an independent ledger: the door's
    bytes are the sum of its tickets' reservations, never past the budget but for one request alone, every
    reservation covers the bytes arrived, and a body on pace keeps its reservation."""
    import numpy as np

    rng = np.random.default_rng(seed)
    clock = FakeClock()
    budget = int(rng.integers(20, 60)) * MiB
    door = Door(max_requests=1000, max_bytes=budget, max_pixels=10, pace_s=5.0, grace_s=0.25, clock=clock)
    live: list[Ticket] = []
    behind: set[int] = set()
    for _ in range(3000):
        op = rng.integers(0, 5)
        if op == 0:
            with contextlib.suppress(Busy):
                live.append(door.admit(int(rng.integers(0, 12 * MiB))))
        elif op == 1 and live:
            t = live[int(rng.integers(len(live)))]
            if not t.started:
                room = max(t.declared - t.arrived, 0) if t.declared else int(rng.integers(1, MiB))
                if room:
                    with contextlib.suppress(Busy):
                        t.received(int(rng.integers(1, room + 1)))
        elif op == 2:
            clock.t += float(rng.uniform(0, 0.3))
        elif op == 3 and live:
            t = live[int(rng.integers(len(live)))]
            if not t.started and (not t.declared or t.arrived == t.declared):
                t.start()
        elif op == 4 and live:
            live.pop(int(rng.integers(len(live)))).release()
        ledger = sum(t.bytes for t in live)
        assert door.bytes == ledger
        assert door.bytes <= budget or len([t for t in live if t.bytes]) == 1
        for t in live:
            assert t.bytes >= t.arrived
            if t.started or not t.declared:
                continue
            if t.arrived <= t.declared * (clock.t - t.admitted_at - 0.25) / 5.0:
                behind.add(id(t))  # from now on its reservation may be taken (and stays taken)
            elif id(t) not in behind:
                assert t.bytes == t.declared, "a body always on pace lost its reservation"
    assert door.reclaimed > 0 and behind  # the walk went where it matters
    for t in live:
        t.release()
    assert (door.bytes, door.reading, door.requests) == (0, 0, 0)


@pytest.mark.parametrize(
    ("value", "status"),
    [("\u00b2", 400), ("\u00b9\u00b2", 400), ("+12", 400), ("0x10", 400), ("", 400), ("9" * 5000, 413)],
)
def test_content_length_must_be_ascii_digits(value, status):
    """'²'.isdigit() is True in Python and int() of 5000 digits raises: neither may become a 500."""
    door = Door(max_requests=4, max_bytes=1000, max_pixels=100)
    metrics = ServeMetrics()

    async def app(scope, receive, send):  # pragma: no cover - must not run
        raise AssertionError("the app ran")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = _scope()
    scope["headers"].append((b"content-length", value.encode("latin-1")))
    mw = AdmissionMiddleware(app, door, max_body_bytes=10_000, body_timeout_s=5, metrics=metrics)
    start, body = _call(mw, scope, receive)
    assert start["status"] == status, body
    assert (door.bytes, door.reading, door.requests) == (0, 0, 0)
    if status == 400:
        assert b"Content-Length" in body["body"]


def _hostage(port: int, drip: bool, stop: threading.Event, length: int = 20 * MiB) -> threading.Thread:
    """A client that declares ``length`` body bytes and sends nothing, or a byte a second; it reconnects when cut."""

    def run() -> None:
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                head = f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n"
                s.sendall(head.encode() + b"\r\n")
                while not stop.wait(1.0):
                    if drip:
                        s.sendall(b"x")
                    s.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        if s.recv(4096) == b"":
                            break  # cut: come back
                    s.setblocking(True)
                s.close()
            except OSError:
                stop.wait(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def budget_server(standin_onnx):
    """A live server with the default byte budget (160 MiB) and body size (20 MiB)."""
    from attn_export.serve.app import create_app

    app = create_app(make_settings(standin_onnx, warmup=False, max_wait_ms=0.0))
    with LiveServer(app) as server:
        server.app = app
        yield server


@pytest.mark.parametrize("hostages", [8, 64])
def test_clients_declaring_big_bodies_hold_no_one_hostage(budget_server, hostages):
    """8 or 64 clients each declare 20 MiB (together the whole budget or more) and send nothing or a byte a
    second: a normal client keeps getting 200s, and what the door holds is the bytes that arrived."""
    stop = threading.Event()
    threads = [_hostage(budget_server.port, drip=i % 2 == 1, stop=stop) for i in range(hostages)]
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # all of them connected and waiting at the door or reading
            text = httpx.get(f"{budget_server.url}/metrics", timeout=10).text
            if _metric(text, "attn_export_reading_requests") >= min(hostages, 8):
                break
            time.sleep(0.05)
        statuses, took = [], []
        for i in range(12):
            img = make_image((320, 320), [cell_square(i % 3, i % 10, (i * 3) % 10)])
            t0 = time.perf_counter()
            r = httpx.post(f"{budget_server.url}/detect", files=_png(img), timeout=30)
            took.append(time.perf_counter() - t0)
            statuses.append(r.status_code)
            if r.status_code == 200:
                assert r.json()["images"][0]["detections"][0]["class_id"] == i % 3
            time.sleep(0.1)
        assert statuses == [200] * 12, (statuses, took)
        assert max(took) < 5.0, took
        door = budget_server.app.state.service.door
        assert door.reading >= min(hostages, 8) and door.bytes <= door.max_bytes
    finally:
        stop.set()
        for t in threads:
            t.join(5)


# ------------------------------------------------------------------------------------------ gRPC inside the budget
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def grpc_budget(standin_onnx):
    """A live server with gRPC, 4 MiB messages and an 8 MiB byte budget; its app and a channel to it."""
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc")
    from attn_export.serve.app import create_app

    settings = make_settings(
        standin_onnx, warmup=False, grpc_port=0, max_body_bytes=4 * MiB, max_bytes_in_flight=8 * MiB, max_wait_ms=0.0
    )
    app = create_app(settings)
    with LiveServer(app) as server:
        server.app = app
        port = app.state.service.grpc_port
        options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
        server.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        yield server
        server.channel.close()


def _infer_message(cls: int, pad: int) -> bytes:
    """A ModelInferRequest of one image with one ``cls`` square, padded to about ``pad`` bytes by its ``id``."""
    from tritonclient.grpc import service_pb2 as pb

    image = make_image((320, 320), [cell_square(cls, 1, 2)])
    request = pb.ModelInferRequest(model_name="standin", id="x" * pad)
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
    return request.SerializeToString()


def _spy_passages(monkeypatch, door) -> list[tuple[int, int]]:
    """(door.reading, door.bytes) each time a ModelInfer passes the door with its message parsed."""
    seen: list[tuple[int, int]] = []
    passage = door.passage

    def spy(nbytes, on_idle=None):
        seen.append((door.reading, door.bytes))
        return passage(nbytes, on_idle)

    monkeypatch.setattr(door, "passage", spy)
    return seen


def test_grpc_message_is_admitted_before_it_is_read(grpc_budget, monkeypatch):
    """The door holds a gRPC call (its request place pending, its bytes reserved) before the message is
    received and parsed, not after (40 unread 19 MiB messages took 1.9 GB that way)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    door = grpc_budget.app.state.service.door
    seen = _spy_passages(monkeypatch, door)
    call = grpc_budget.channel.unary_unary(GRPC_METHOD, response_deserializer=pb.ModelInferResponse.FromString)
    data = _infer_message(2, 3 * MiB)
    reply = call(data, timeout=30)
    assert reply.raw_output_contents and len(reply.id) == 3 * MiB
    (reading, held), *_ = seen
    assert reading == 1 and held >= len(data)  # admitted, and charged, while its message was read
    # a door full of real bytes refuses the next call before its message is read
    seen.clear()
    full = door.admit(door.max_bytes)
    full.settle(door.max_bytes)
    full.start()
    try:
        with pytest.raises(grpc.RpcError) as info:
            call(data, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "retry after" in info.value.details()
        assert dict(info.value.trailing_metadata())["retry-after"].isdigit()
        assert seen == []  # never parsed
    finally:
        door.leave(full, answered=False)
    assert (door.bytes, door.reading, door.requests) == (0, 0, 0)


def test_grpc_calls_in_a_burst_stay_within_the_budget(grpc_budget, monkeypatch):
    """24 concurrent 3 MiB messages against an 8 MiB budget: each is parsed only within it (the others
    wait at the door, or are UNAVAILABLE there), and the right answers come back."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2 as pb

    door = grpc_budget.app.state.service.door
    seen = _spy_passages(monkeypatch, door)
    call = grpc_budget.channel.unary_unary(GRPC_METHOD, response_deserializer=pb.ModelInferResponse.FromString)
    rng = np.random.default_rng(7)
    classes = [int(c) for c in rng.integers(0, 3, 24)]

    def one(cls: int):
        try:
            reply = call(_infer_message(cls, 3 * MiB), timeout=60)
        except grpc.RpcError as e:
            return e.code().name
        return int(np.frombuffer(reply.raw_output_contents[3], "<i4")[0])  # detection_classes

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, classes))
    assert all(r == c or r == "UNAVAILABLE" for r, c in zip(results, classes, strict=True)), results
    assert sum(r == c for r, c in zip(results, classes, strict=True)) >= 2
    assert seen and all(reading >= 1 and held <= door.max_bytes for reading, held in seen)  # parsed inside it
    assert (door.bytes, door.reading, door.requests) == (0, 0, 0)


def test_grpc_calls_that_send_nothing_hold_no_one_hostage(grpc_budget):
    """Two calls that open and never send their message (together the whole budget) lose their room to a
    call that sends one, after the unseen grace (1 s): UNAVAILABLE for them, an answer for it."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    release = threading.Event()

    def never():
        release.wait(30)
        return
        yield  # a generator that sends nothing

    hostage = grpc_budget.channel.stream_unary(GRPC_METHOD, response_deserializer=pb.ModelInferResponse.FromString)
    door = grpc_budget.app.state.service.door
    held = [hostage.future(never(), timeout=30) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while door.reading < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert door.reading == 2 and door.bytes == door.max_bytes
        call = grpc_budget.channel.unary_unary(GRPC_METHOD, response_deserializer=pb.ModelInferResponse.FromString)
        t0 = time.perf_counter()
        reply = call(_infer_message(0, 1000), timeout=30)
        assert time.perf_counter() - t0 < 5
        assert int.from_bytes(reply.raw_output_contents[3][:4], "little") == 0  # class 0
        with pytest.raises(grpc.RpcError) as info:
            held[0].result(10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "did not arrive" in info.value.details()
    finally:
        release.set()
        for f in held:
            f.cancel()
    deadline = time.monotonic() + 10
    while door.reading and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (door.bytes, door.reading, door.requests) == (0, 0, 0)
