"""The HTTP service on the stand-in detector: every endpoint, bad inputs, API key, limits, batching."""

from __future__ import annotations

import concurrent.futures
import io
import re
import time

import httpx
import pytest
from PIL import Image
from serve_helpers import CLASSES, LiveServer, bad_inputs, cell_square, client_for, make_image, make_settings


def _png(data=None, name="a.png"):
    return {"images": (name, data if data is not None else make_image(), "image/png")}


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    found = re.findall(pattern, text, re.M)
    return sum(float(v) for v in found)


# ------------------------------------------------------------------------------------------ endpoints
def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_reports_the_model(client, standin_onnx):
    body = client.get("/readyz").json()
    assert body["ready"] is True
    assert body["backend"] == "onnxruntime" and body["provider"] == "CPUExecutionProvider"
    assert body["classes"] == CLASSES and body["input_size"] == 320
    assert body["max_batch"] == 4  # the default on a CPU
    assert body["max_in_flight"] == 16  # 4 batches' worth by default
    assert body["path"] == standin_onnx.name  # the absolute path only with the API key (test_no_500.py)


def test_detect_json(client):
    img = make_image((320, 320), [cell_square(0, 2, 3), cell_square(2, 7, 5)])
    r = client.post("/detect", files=_png(img))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "standin" and body["backend"] == "onnxruntime"
    assert body["params"] == {"conf": 0.25, "iou": 0.45, "max_det": 100}
    (res,) = body["images"]
    assert (res["width"], res["height"], res["format"], res["filename"]) == (320, 320, "PNG", "a.png")
    found = {(d["class_name"], tuple(d["box"])) for d in res["detections"]}
    assert found == {("circle", (96.0, 64.0, 128.0, 96.0)), ("rectangle", (160.0, 224.0, 192.0, 256.0))}
    assert all(d["score"] > 0.99 for d in res["detections"])
    for key in ("decode_ms", "queue_ms", "inference_ms", "postprocess_ms", "total_ms"):
        assert body["timings"][key] >= 0
    assert set(res["timings"]) == {"decode_ms", "queue_ms", "inference_ms", "postprocess_ms"}
    assert "total;dur=" in r.headers["server-timing"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_detect_maps_boxes_to_original_pixels(client, fmt):
    # 640 x 480 -> scale 0.5, padded 40 px top and bottom: the square lands on one cell of the input
    extra = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    img = make_image((640, 480), [(1, 128, 48, 64)], fmt=fmt, **extra)
    r = client.post("/detect", files={"images": (f"a.{fmt.lower()}", img, f"image/{fmt.lower()}")})
    assert r.status_code == 200, r.text
    (res,) = r.json()["images"]
    assert (res["width"], res["height"], res["format"]) == (640, 480, fmt)
    (det,) = res["detections"]
    assert det["class_name"] == "triangle"
    assert det["box"] == pytest.approx([128, 48, 192, 112], abs=0.5)


@pytest.mark.parametrize(
    ("fmt", "size", "square", "box"),
    [
        # 1280 x 960 JPEG: scale 0.25; the decoder draws it at 1/2 (DCT scaling), the letterbox does the rest
        ("JPEG", (1280, 960), (2, 256, 96, 128), [256, 96, 384, 224]),
        # 1920 x 1440 PNG: scale 1/6; a 3x box reduction first, then the letterbox
        ("PNG", (1920, 1440), (2, 384, 144, 192), [384, 144, 576, 336]),
    ],
)
def test_detect_large_images_are_shrunk_first(client, fmt, size, square, box):
    img = make_image(size, [square], fmt=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    (res,) = client.post("/detect", files=_png(img, "big")).json()["images"]
    assert (res["width"], res["height"]) == size
    (det,) = res["detections"]
    assert det["class_name"] == "rectangle" and det["box"] == pytest.approx(box, abs=2)


def test_detect_applies_exif_orientation(client):
    # stored 480 wide x 640 high, EXIF orientation 6 (rotate 90 clockwise to display): displayed 640 x 480
    stored = Image.open(io.BytesIO(make_image((640, 480), [(0, 128, 48, 64)]))).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    (res,) = client.post("/detect", files=_png(buf.getvalue(), "rot.jpg")).json()["images"]
    assert (res["width"], res["height"]) == (640, 480)
    (det,) = res["detections"]
    assert det["box"] == pytest.approx([128, 48, 192, 112], abs=1)


def test_detect_several_images_in_one_request(client):
    images = [make_image((320, 320), [cell_square(i % 3, i, i)]) for i in range(5)]
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    body = client.post("/detect", files=files).json()
    assert [res["index"] for res in body["images"]] == list(range(5))
    for i, res in enumerate(body["images"]):
        (det,) = res["detections"]
        assert det["class_id"] == i % 3 and det["box"] == [32.0 * i, 32.0 * i, 32.0 * i + 32, 32.0 * i + 32]
        assert res["batch_size"] >= 1


def test_detect_raw_image_body(client):
    img = make_image((320, 320), [cell_square(0, 0, 0)], fmt="JPEG", quality=95)
    r = client.post("/detect", content=img, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    (res,) = r.json()["images"]
    assert res["filename"] is None and res["detections"][0]["box"] == [0.0, 0.0, 32.0, 32.0]


def test_detect_parameters(client):
    img = make_image((320, 320), [cell_square(0, r, 1) for r in range(6)])
    dets = lambda **p: client.post("/detect", params=p, files=_png(img)).json()["images"][0]["detections"]  # noqa: E731
    assert len(dets()) == 6
    assert len(dets(max_det=2)) == 2
    assert dets(conf=1.0) == []
    body = client.post("/detect", params={"conf": 0.5, "iou": 0.3, "max_det": 7}, files=_png(img)).json()
    assert body["params"] == {"conf": 0.5, "iou": 0.3, "max_det": 7}


@pytest.mark.parametrize(
    ("params", "accept"),
    [({"format": "png"}, None), ({}, "image/png"), ({}, "image/png, application/json;q=0.5")],
)
def test_detect_png_output(client, params, accept):
    img = make_image((320, 320), [cell_square(0, 2, 2)])
    headers = {"accept": accept} if accept else {}
    r = client.post("/detect", params=params, files=_png(img), headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-detections"] == "1" and "inference;dur=" in r.headers["server-timing"]
    drawn = Image.open(io.BytesIO(r.content))
    assert drawn.size == (320, 320)
    # the box [64, 64, 96, 96] is outlined in class 0's colour over the red square; the rest stays black
    rgb = drawn.convert("RGB")
    assert rgb.getpixel((64, 80)) == rgb.getpixel((80, 96)) == (230, 25, 75)
    assert rgb.getpixel((80, 80)) == (255, 0, 0) and rgb.getpixel((200, 200)) == (0, 0, 0)


def test_json_preferred_by_accept(client):
    r = client.post("/detect", files=_png(), headers={"accept": "application/json, image/png;q=0.9"})
    assert r.headers["content-type"] == "application/json"


def test_metrics(client):
    client.post("/detect", files=_png())
    text = client.get("/metrics").text
    assert "attn_export_batch_size_bucket" in text and "attn_export_queue_depth" in text
    assert _metric(text, "attn_export_http_requests_total", '{method="POST",route="/detect",status="200"}') >= 1
    assert _metric(text, "attn_export_http_request_duration_seconds_count", '{route="/detect"}') >= 1
    assert _metric(text, "attn_export_ready") == 1
    assert 'attn_export_model_info{backend="onnxruntime"' in text
    assert 'attn_export_stage_seconds_count{stage="decode"}' in text


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    assert {"/detect", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/jpeg" in body
    params = {p["name"] for p in spec["paths"]["/detect"]["post"]["parameters"]}
    assert {"conf", "iou", "max_det", "format"} <= params
    assert client.get("/docs").status_code == 200


def test_index_page_and_static(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "static/app.js" in page.text
    assert "fetch(`detect?" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.get("/detect")
    assert r.status_code == 405 and r.json()["status"] == 405


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_get_clear_4xx_and_the_server_keeps_answering(client):
    limit = client.app.state.service.settings.max_body_bytes
    for name, request, status, kind, words in bad_inputs(limit):
        r = client.post("/detect", **request)
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert body["error"] == kind and body["status"] == status, (name, body)
        assert words in str(body["detail"]), (name, body)
        assert client.get("/healthz").status_code == 200
    ok = client.post("/detect", files=_png(make_image((320, 320), [cell_square(0, 1, 1)])))
    assert ok.status_code == 200 and len(ok.json()["images"][0]["detections"]) == 1
    text = client.get("/metrics").text
    assert _metric(text, "attn_export_rejected_inputs_total", '{reason="too_many_pixels"}') >= 2


def test_body_limit_without_content_length(client):
    def chunks():
        for _ in range(40):
            yield bytes(100_000)

    r = client.post("/detect", content=chunks(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_bad_inputs_on_a_real_server(live_server):
    """The same corpus through uvicorn on 127.0.0.1 (real sockets: the 50 MB upload is refused mid-stream)."""
    limit = 2 * 1024 * 1024
    with httpx.Client(base_url=live_server.url, timeout=60) as http:
        for name, request, status, kind, _words in bad_inputs(limit):
            r = http.post("/detect", **request)
            assert r.status_code == status and r.json()["error"] == kind, (name, r.text)
        assert http.get("/healthz").json() == {"status": "ok"}
        r = http.post("/detect", files=_png(make_image((320, 320), [cell_square(1, 3, 3)])))
        assert r.json()["images"][0]["detections"][0]["class_name"] == "triangle"


# ------------------------------------------------------------------------------------------ access, limits
def test_api_key(standin_onnx):
    settings = make_settings(standin_onnx, api_key="s3cret", warmup=False)
    with client_for(settings) as c:
        missing = c.post("/detect", files=_png())
        assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
        wrong = c.post("/detect", files=_png(), headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and "wrong API key" in wrong.json()["detail"]
        assert c.post("/detect", files=_png(), headers={"X-API-Key": "s3cret"}).status_code == 200
        # the other endpoints stay open (probes, scrapers, the page)
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/").status_code == 200
        spec = c.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_limits_from_settings(standin_onnx):
    settings = make_settings(standin_onnx, max_body_bytes=50_000, max_pixels=110_000, max_side=400, max_images=2)
    with client_for(settings) as c:
        assert c.post("/detect", files=_png(make_image((320, 320)))).status_code == 200
        big = make_image((400, 300))  # 120,000 px
        r = c.post("/detect", files=_png(big))
        assert r.status_code == 413 and "400x300" in r.json()["detail"]
        wide = make_image((401, 10))
        assert c.post("/detect", files=_png(wide)).json()["error"] == "too_many_pixels"
        three = [("images", ("a.png", make_image((32, 32)), "image/png"))] * 3
        assert c.post("/detect", files=three).json()["error"] == "too_many_images"
        noisy = Image.frombytes("RGB", (300, 300), bytes(range(256)) * 1055)
        buf = io.BytesIO()
        noisy.save(buf, format="BMP")
        r = c.post("/detect", files=_png(buf.getvalue(), "n.bmp"))
        assert r.status_code == 413 and "50,000 bytes" in r.json()["detail"]


def test_class_names_from_settings(standin_onnx):
    with client_for(make_settings(standin_onnx, class_names=["a", "b"], warmup=False)) as c:
        assert c.get("/readyz").json()["classes"] == ["a", "b", "class2", "class3"]
        img = make_image((320, 320), [cell_square(1, 0, 0)])
        assert c.post("/detect", files=_png(img)).json()["images"][0]["detections"][0]["class_name"] == "b"


# ------------------------------------------------------------------------------------------ batching
def _slow_loader(delay: float):
    """The real loader, with each inference call made ``delay`` seconds longer (like a real model's)."""

    def loader(settings):
        from attn_export.detection.loader import load

        model = load(settings)
        fast = model.infer

        def infer(batch):
            time.sleep(delay)
            return fast(batch)

        model.infer = infer
        return model

    return loader


def test_requests_sent_together_are_batched(standin_onnx):
    """16 requests at once: batches of more than one image, and each request gets its own boxes."""
    from attn_export.serve.app import create_app

    settings = make_settings(standin_onnx, max_batch=8, max_wait_ms=5.0, warmup=False)
    cases = [(i % 3, i // 4, (i * 3) % 10) for i in range(16)]
    images = [make_image((320, 320), [cell_square(c, r, col)]) for c, r, col in cases]
    with LiveServer(create_app(settings, loader=_slow_loader(0.05))) as server:

        def metrics():
            return httpx.get(f"{server.url}/metrics").text

        before = metrics()

        def one(i):
            with httpx.Client(base_url=server.url, timeout=60) as http:
                return http.post("/detect", files=_png(images[i], f"{i}.png")).json()

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
        after = metrics()
    for (cls, row, col), body in zip(cases, answers, strict=True):
        (det,) = body["images"][0]["detections"]
        assert det["class_id"] == cls
        assert det["box"] == [32.0 * col, 32.0 * row, 32.0 * col + 32, 32.0 * row + 32]
    assert max(body["images"][0]["batch_size"] for body in answers) > 1
    batches = _metric(after, "attn_export_batch_size_count") - _metric(before, "attn_export_batch_size_count")
    images_run = _metric(after, "attn_export_batch_size_sum") - _metric(before, "attn_export_batch_size_sum")
    assert images_run == 16 and batches < 16, (batches, images_run)
    assert 'attn_export_batch_size_bucket{le="1.0"}' in after
    assert _metric(after, "attn_export_queue_depth") == 0
