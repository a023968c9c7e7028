"""Rectangular inference and the YOLO heads, through the service.

- the rect letterbox: the smallest rectangle of whole strides with the long side at the model's size,
  the same pixels as the square letterbox's content, boxes mapped back to the original image;
- the heads: YOLOv5 (batch, N, 5 + nc) and YOLOv8 (batch, 4 + nc, N) decoded as a float64 numpy decoding
  of the raw output says, told apart from the graph's shape and metadata or by ``head``;
- the batcher with images of several shapes: grouped by shape or padded to the largest;
- served: a detector whose boxes are known from the picture lands on the right pixels, rect and square,
  at several aspect ratios; the YOLO stand-ins answer ``/detect``, ``/v2`` over HTTP and gRPC with the
  numpy decoding of the graph's raw output on the rect letterbox.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import LiveServer, client_for, free_port, make_settings
from yolo_standins import ColourBoxes, YoloV5StandIn, YoloV8StandIn, export_free_hw, reference, v5_decode, v8_decode

from attn_export.detection import contract
from attn_export.detection.heads import HeadError, choose_head, decode, describe_module
from attn_export.detection.loader import export_metadata
from attn_export.detection.postprocess import PAD_VALUE, letterbox_u8, rect_shape
from attn_export.serve.batching import Batcher

SIZE = 320


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    torch.manual_seed(20)
    v5, v8 = YoloV5StandIn(), YoloV8StandIn()
    return {
        "v5": export_free_hw(v5, folder / "yolov5.onnx", metadata=export_metadata(v5, None, (3, SIZE, SIZE))),
        "v5_bare": export_free_hw(v5, folder / "yolov5_bare.onnx"),
        "v8_bare": export_free_hw(v8, folder / "yolov8_bare.onnx"),
        "colour": export_free_hw(
            ColourBoxes(),
            folder / "colour.onnx",
            metadata={"classes": ["r", "g", "b"], "dynamic_hw": {"min": 64, "opt": 320, "max": 320}},
        ),
    }


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("hw", [(1080, 1920), (720, 1280), (1920, 1080), (333, 517), (300, 300), (97, 640)])
def test_rect_letterbox_is_the_smallest_stride_rectangle_around_the_square_content(hw):
    h, w = hw
    rng = np.random.default_rng(h * 7 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    s = SIZE / max(h, w)
    nh, nw = round(h * s), round(w * s)
    want = (math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32)
    assert rect_shape(h, w, SIZE, 32) == want
    floor = (max(want[0], 96), max(want[1], 96))  # a graph verified down to 90 px a side: 96 at least
    assert rect_shape(h, w, SIZE, 32, 90) == floor
    assert letterbox_u8(img, SIZE, 32, 90)[0].shape == (3, *floor)
    rect, r_scale, (rx, ry) = letterbox_u8(img, SIZE, 32)
    square, q_scale, (qx, qy) = letterbox_u8(img, SIZE)
    assert rect.shape == (3, *want) and max(want) == SIZE and r_scale == q_scale
    assert (rx, ry) == ((want[1] - nw) // 2, (want[0] - nh) // 2)
    np.testing.assert_array_equal(rect[:, ry : ry + nh, rx : rx + nw], square[:, qy : qy + nh, qx : qx + nw])
    pad = np.ones(rect.shape[1:], bool)
    pad[ry : ry + nh, rx : rx + nw] = False
    assert (rect[:, pad] == PAD_VALUE).all()


# ------------------------------------------------------------------------------------------ heads
def test_heads_decode_as_numpy_does():
    rng = np.random.default_rng(5)
    v5 = rng.uniform(0, 300, (2, 50, 8)).astype(np.float32)
    v5[..., 4:] = rng.uniform(0, 1, (2, 50, 4))
    v8 = rng.uniform(0, 300, (2, 9, 60)).astype(np.float32)
    v8[:, 4:] = rng.uniform(0, 1, (2, 5, 60))
    for raw, head, ref in ((v5, "yolov5", v5_decode), (v8, "yolov8", v8_decode)):
        rows = decode(raw, head)
        assert rows.shape == ((2, 50, 4 + 3) if head == "yolov5" else (2, 60, 4 + 5))
        for i in range(2):
            boxes, best, cls = ref(raw[i])
            np.testing.assert_allclose(rows[i, :, :4], boxes, rtol=1e-6, atol=1e-4)
            np.testing.assert_allclose(rows[i, :, 4:].max(1), best, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(rows[i, :, 4:].argmax(1), cls)
    np.testing.assert_array_equal(decode(v5, "contract"), v5)


@pytest.mark.parametrize(
    "shape, meta, forced, want",
    [
        (["batch", 2100, 8], {}, None, "contract"),
        (["batch", "n", 8], {"classes": '["a", "b", "c", "d"]'}, None, "contract"),
        (["batch", "n", 8], {"classes": '["a", "b", "c"]'}, None, "yolov5"),  # 5 + 3
        (["batch", 84, 8400], {}, None, "yolov8"),
        (["batch", 9, "n"], {}, None, "yolov8"),
        (["batch", 9, "n"], {"names": '{"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"}'}, None, "yolov8"),
        (["batch", 2100, 8], {"head": "yolov5"}, None, "yolov5"),
        (["batch", 2100, 8], {"head": "yolov5"}, "contract", "contract"),
        (["batch", "n", 8], {}, "yolov5", "yolov5"),
    ],
)
def test_the_head_is_told_from_shape_metadata_or_choice(shape, meta, forced, want):
    assert choose_head(shape, meta, forced) == want


def test_a_head_that_cannot_read_the_output_is_refused():
    with pytest.raises(HeadError, match="no class scores"):
        choose_head(["batch", 4, "n"], {}, "yolov8")
    with pytest.raises(HeadError, match="choose one of"):
        choose_head(["batch", "n", 8], {}, "yolov7")


def test_the_export_metadata_comes_from_the_upstream_attributes():
    v5, v8 = YoloV5StandIn(nc=3), YoloV8StandIn(nc=5)
    assert describe_module(v5) == {"head": "yolov5", "stride": 16, "classes": ["v5_0", "v5_1", "v5_2"]}
    assert describe_module(v8) == {"head": "yolov8", "stride": 16, "classes": [f"v8_{i}" for i in range(5)]}
    assert describe_module(v8, {"classes": ["x"] * 5})["classes"] == ["x"] * 5  # the checkpoint's names first
    assert describe_module(ColourBoxes()) == {"stride": 32}
    assert export_metadata(v5, None, (3, 256, 256))["input_size"] == 256
    from attn_export.cli import _export_metadata  # what `attn-export MODEL.pt` writes
    from attn_export.export.checkpoint import LoadedModel

    loaded = LoadedModel(v8, None, "pickle", "YoloV8StandIn", {})
    assert _export_metadata(loaded, (3, 320, 320)) == {**describe_module(v8), "input_size": 320}


# ------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("policy", ["group", "pad"])
def test_the_batcher_groups_or_pads_images_of_several_shapes(policy):
    seen: list[tuple[int, ...]] = []

    def infer(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        return x.astype(np.int32) + 1

    rng = np.random.default_rng(11)
    shapes = [(3, 192, 320), (3, 320, 192), (3, 320, 320), (3, 128, 320)]
    images = [rng.integers(0, 200, shapes[i % 4], dtype=np.uint8) for i in range(14)]
    batcher = Batcher(infer, max_batch=4, max_wait_s=0.05, queue_size=64, shapes=policy).start()

    async def main():
        return await asyncio.gather(*(batcher.submit([im]) for im in images))

    try:
        results = asyncio.run(main())
    finally:
        assert batcher.close(timeout=10)
    for im, (res,) in zip(images, results, strict=True):
        out = res.output
        h, w = im.shape[1:]
        np.testing.assert_array_equal(out[:, :h, :w], im.astype(np.int32) + 1)  # its own pixels, top-left
        assert (out[:, h:, :] == PAD_VALUE + 1).all() and (out[:, :, w:] == PAD_VALUE + 1).all()
        if policy == "group":
            assert out.shape == im.shape
    assert sum(s[0] for s in seen) == len(images) and max(s[0] for s in seen) <= 4
    if policy == "pad":
        assert any(s[0] > 1 for s in seen)
    assert batcher.images == len(images)


# ------------------------------------------------------------------------------------------ served
def _colour_scene(w: int, h: int, rects) -> np.ndarray:
    img = np.full((h, w, 3), 40, np.uint8)
    for cls, (x1, y1, x2, y2) in rects:
        img[y1:y2, x1:x2] = 0
        img[y1:y2, x1:x2, cls] = 255
    return img


@pytest.mark.parametrize("rect", [True, False])
def test_boxes_land_on_the_right_pixels_rect_and_square(graphs, rect):
    scenes = [
        (640, 360, [(0, (100, 60, 300, 200)), (2, (400, 240, 620, 350))]),
        (360, 640, [(1, (20, 500, 200, 630)), (0, (200, 40, 340, 180))]),
        (1000, 300, [(2, (30, 30, 130, 270)), (1, (700, 100, 980, 220))]),
        (300, 300, [(0, (30, 30, 150, 150))]),
        (1600, 200, [(1, (100, 40, 700, 160))]),  # 320 x 40: rect 320 x 64, the graph's smallest side
    ]
    settings = make_settings(graphs["colour"], rect=rect, max_batch=4)
    with client_for(settings) as client:
        service = client.app.state.service
        assert service.model.rect is rect and service.pipeline.limits.stride == (32 if rect else None)
        assert service.pipeline.limits.min_side == (64 if rect else 0)
        for w, h, rects in scenes:
            r = client.post("/detect", files={"images": ("a.png", _png(_colour_scene(w, h, rects)), "image/png")})
            assert r.status_code == 200, r.text
            dets = sorted((d["class_id"], d["box"]) for d in r.json()["images"][0]["detections"])
            assert [c for c, _ in dets] == sorted(c for c, _ in rects)
            tol = max(w, h) / SIZE + 0.5  # one input pixel, in original pixels
            for (cls, box), (want_cls, want) in zip(dets, sorted(rects), strict=True):
                assert cls == want_cls
                np.testing.assert_allclose(box, want, atol=tol)


def _noise(w: int, h: int, seed: int) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _check(got_boxes, got_scores, got_cls, want) -> None:
    _, boxes, scores, cls = want
    assert len(got_scores) == len(scores)
    np.testing.assert_allclose(got_scores, scores, atol=2e-5)
    np.testing.assert_array_equal(got_cls, cls)
    np.testing.assert_allclose(got_boxes, boxes, atol=0.02)


@pytest.mark.parametrize(
    "graph, head, names",
    [("v5", None, ["v5_0", "v5_1", "v5_2"]), ("v5_bare", "yolov5", None), ("v8_bare", None, None)],
)
def test_yolo_heads_answer_detect_v2_and_grpc_as_numpy_decodes(graphs, graph, head, names):
    pytest.importorskip("grpc")
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from attn_export.serve.app import create_app

    want_head = head or ("yolov5" if graph.startswith("v5") else "yolov8")
    settings = make_settings(graphs[graph], head=head, max_batch=4, grpc_port=free_port())
    images = [_noise(640, 360, 1), _noise(300, 520, 2)]
    stride = 16 if graph == "v5" else 32  # the metadata's, else the default
    app = create_app(settings)
    with LiveServer(app) as live:
        service = app.state.service
        assert service.model.head == want_head and service.model.stride == stride and service.model.rect
        model_name = graphs[graph].stem
        meta = httpx.get(f"{live.url}/v2/models/{model_name}").json()
        assert meta["name"] == model_name
        for data in images:
            want = reference(graphs[graph], data, want_head, stride)
            params = {"conf": want[0], "iou": 1.0, "max_det": 100}
            r = httpx.post(f"{live.url}/detect", files={"images": ("a.png", data)}, params=params, timeout=30)
            assert r.status_code == 200, r.text
            dets = r.json()["images"][0]["detections"]
            _check([d["box"] for d in dets], [d["score"] for d in dets], [d["class_id"] for d in dets], want)
            if names:
                assert {d["class_name"] for d in dets} <= set(names)
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                "data": [base64.b64encode(data).decode()]}], "parameters": params}  # fmt: skip
            r = httpx.post(f"{live.url}/v2/models/{model_name}/infer", json=body, timeout=30)
            assert r.status_code == 200, r.text
            out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
            ((b, s, c),) = contract.unpack(out)
            _check(b, s, c, want)
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{service.grpc_port}")
            try:
                tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([data], dtype=object).reshape(1, 1))
                res = client.infer(model_name, [tensor], parameters={k: str(v) for k, v in params.items()})
            finally:
                client.close()
            ((b, s, c),) = contract.unpack({n: res.as_numpy(n) for n in contract.OUTPUTS})
            _check(b, s, c, want)


def test_the_rect_benchmark_prints_its_figures(graphs, tmp_path, capsys):
    from attn_export.serve.rect_bench import main

    out = tmp_path / "figures.json"
    assert main([str(graphs["colour"]), "--count", "1", "--mixed", "4", "--repeat", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "rect / square" in text
    figures = json.loads(out.read_text())
    assert figures["rect"]["batches"] >= 1 and figures["square"]["images_per_s"] > 0
    assert set(figures) >= {"cpu", "square", "rect", "mixed group", "mixed pad"}


def test_a_yolo_checkpoint_exports_with_its_head_stride_and_names_in_the_metadata(tmp_path, monkeypatch):
    """The service's export of a checkpoint writes what the model says (``Detect`` attributes, ``names``)
    into the graph's metadata through ``export_onnx(metadata=...)``; the service reads the head from it."""
    from attn_export.detection.loader import LoadOptions, load, onnx_metadata
    from attn_export.export import save_checkpoint
    from attn_export.export.checkpoint import architectures

    monkeypatch.setitem(architectures(), "YoloV5StandIn", YoloV5StandIn)
    torch.manual_seed(8)
    path = save_checkpoint(tmp_path / "yolo.pt", YoloV5StandIn(), "YoloV5StandIn", {}, (3, 64, 64))
    served = load(LoadOptions(path, threads=1, cache_dir=tmp_path / "cache", max_batch=2))
    props = onnx_metadata(served.path)
    assert props["head"] == "yolov5" and json.loads(props["stride"]) == 16 and json.loads(props["input_size"]) == 64
    assert json.loads(props["classes"]) == ["v5_0", "v5_1", "v5_2"] == served.class_names
    assert served.head == "yolov5" and served.stride == 16 and served.input_size == 64
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    raw = YoloV5StandIn.forward(_reloaded(path), torch.from_numpy(x))[0].detach().numpy()
    rows = served.infer(x)
    for i in range(2):
        boxes, best, _ = v5_decode(raw[i])
        np.testing.assert_allclose(rows[i, :, :4], boxes, atol=1e-3)
        np.testing.assert_allclose(rows[i, :, 4:].max(1), best, atol=1e-5)


def _reloaded(path):
    from attn_export.export import load_model

    return load_model(path).model.eval()


def test_evaluate_detects_rect_in_shape_groups_and_keeps_the_image_order():
    """``attn-export evaluate --rect``: images batched by their letterboxed shape, answers in the images' order,
    boxes where the square letterbox puts them."""
    from attn_export.shapes.evaluate import detect

    model = ColourBoxes().eval()
    shapes_seen = []

    def predict(x: np.ndarray) -> np.ndarray:
        shapes_seen.append(x.shape)
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    scenes = [(640, 360, [(0, (100, 60, 300, 200))]), (300, 500, [(1, (20, 300, 200, 480))]),
              (700, 390, [(2, (400, 200, 690, 380))]), (500, 500, [(0, (10, 10, 90, 90))])]  # fmt: skip
    images = [_colour_scene(w, h, rects) for w, h, rects in scenes]
    rect = detect(predict, images, SIZE, batch=8, conf=0.5, stride=32)
    assert sorted(s[2:] for s in shapes_seen) == [(192, 320), (320, 192), (320, 320)]
    square = detect(predict, images, SIZE, batch=8, conf=0.5)
    assert shapes_seen[-1] == (4, 3, SIZE, SIZE)
    for (w, h, rects), r, q in zip(scenes, rect, square, strict=True):
        ((cls, want),) = rects
        assert list(r[2]) == list(q[2]) == [cls]
        tol = max(w, h) / SIZE + 0.5
        np.testing.assert_allclose(r[0][0], want, atol=tol)
        np.testing.assert_allclose(q[0][0], want, atol=tol)


def test_serve_options_reach_the_settings(graphs):
    from attn_export.serve.cli import parser, settings_from_args

    args = ["--head", "yolov8", "--no-rect", "--batch-shapes", "pad"]
    s = settings_from_args(parser().parse_args([str(graphs["v8_bare"]), *args]))
    assert (s.head, s.rect, s.batch_shapes) == ("yolov8", False, "pad")
    s = settings_from_args(parser().parse_args([str(graphs["v8_bare"])]))
    assert (s.head, s.rect, s.batch_shapes) == (None, None, "group")
    with pytest.raises(SystemExit):
        parser().parse_args([str(graphs["v8_bare"]), "--head", "yolov7"])
