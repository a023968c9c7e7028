"""ShapesDetector: output format, loss and assignment, checkpoint, ONNX export; the shipped weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv
from attn_export.blocks.detector import STRIDES, ShapesDetector
from attn_export.export import export_onnx, load_model, save_checkpoint
from attn_export.shapes.loss import DetectionLoss, assign

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shapes_detector.pt"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ShapesDetector().eval()


def test_uses_all_five_blocks_and_is_small(model):
    kinds = {type(m) for m in model.modules()}
    assert {Involution2d, ODConv2d, SKConv, OutlookAttention, GSoPBlock} <= kinds
    params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= params <= 2_000_000


@pytest.mark.parametrize(("batch", "hw"), [(1, (320, 320)), (2, (96, 160)), (3, (224, 128)), (1, (160, 96))])
def test_forward_shapes(model, batch, hw):
    h, w = hw
    x = torch.rand(batch, 3, h, w)
    with torch.no_grad():
        out = model(x)
    n = sum((h // s) * (w // s) for s in STRIDES)
    assert out.shape == (batch, n, 4 + 4)
    boxes, scores = out[..., :4], out[..., 4:]
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def test_forward_decodes_forward_raw(model):
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        out = model(x)
        logits, dists, points, strides = model.forward_raw(x)
    # the first cell of the stride-8 level is centred at (4, 4)
    assert points[0].tolist() == [4.0, 4.0] and strides[0] == 8 and strides[-1] == 32
    assert torch.allclose(out[..., 4:], logits.sigmoid())
    assert torch.allclose(out[..., :2], points - dists[..., :2])
    assert torch.allclose(out[..., 2:4], points + dists[..., 2:])


def test_checkpoint_round_trip(model, tmp_path):
    path = save_checkpoint(tmp_path / "d.pt", model, "ShapesDetector", {"width": 16}, (3, 320, 320), meta={"x": 1})
    loaded = load_model(path)  # weights-only load
    assert loaded.arch == "ShapesDetector" and loaded.input_shape == (3, 320, 320)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), model(x))


def _targets():
    labels = torch.tensor([[0, 3, -1], [2, -1, -1]])
    boxes = torch.tensor(
        [
            [[10.0, 12.0, 50.0, 40.0], [60.0, 60.0, 65.0, 66.0], [0, 0, 0, 0]],  # the second is 5 x 6 px
            [[20.0, 20.0, 90.0, 90.0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ]
    )
    return labels, boxes, labels >= 0


def test_assignment_gives_every_box_positives_even_tiny_ones():
    torch.manual_seed(0)
    m = ShapesDetector(width=8)
    labels, boxes, mask = _targets()
    with torch.no_grad():
        logits, dists, points, strides = m.forward_raw(torch.rand(2, 3, 96, 96))
    pred = torch.cat([points - dists[..., :2], points + dists[..., 2:]], -1)
    tb, ts, fg = assign(logits.sigmoid(), pred, points, strides, labels, boxes, mask)
    for b in range(2):
        for j in range(int(mask[b].sum())):
            hits = fg[b] & (tb[b] == boxes[b, j]).all(-1)
            assert hits.any(), f"box {j} of image {b} got no positive"
            assert (ts[b, hits].argmax(-1) == labels[b, j]).all()
    assert ((ts > 0).any(-1) == fg).all()
    assert ts.max() <= 1.0


def test_loss_falls_on_one_batch():
    torch.manual_seed(0)
    m = ShapesDetector(width=8)
    labels, boxes, mask = _targets()
    x = torch.rand(2, 3, 96, 96)
    crit = DetectionLoss()
    opt = torch.optim.AdamW(m.parameters(), 3e-3)
    losses = []
    for _ in range(10):
        loss, parts = crit(m.forward_raw(x), (labels, boxes, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert parts["fg"] > 0
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.slow  # the dynamo export takes 20 s or more
def test_exports_to_onnx_and_verifies(tmp_path):
    torch.manual_seed(0)
    m = ShapesDetector(width=8).eval()
    res = export_onnx(m, tmp_path / "det.onnx", (3, 128, 128), batch=(1, 2, 2), seed=0)
    assert res.ok, res.report.table()
    assert res.output_names == ["output"]
    assert {"involution2d", "dynamic_conv2d", "outlook_aggregate"}.isdisjoint(res.ops)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = np.random.default_rng(b).random((b, 3, 128, 128), dtype=np.float32)
        (out,) = sess.run(None, {"input": x})
        with torch.no_grad():
            ref = m(torch.from_numpy(x)).numpy()
        assert out.shape == ref.shape == (b, 16 * 16 + 8 * 8 + 4 * 4, 8)
        assert np.abs(out - ref).max() < 1e-3


@pytest.mark.slow
def test_shipped_checkpoint_reaches_the_target(tmp_path):
    """The issue's criterion as the README reports it: mAP@0.5 >= 0.90 on 500 fresh images (the
    evaluation command's default set); 100 images are too few to decide a target this close."""
    pytest.importorskip("faster_coco_eval")
    from attn_export.shapes.evaluate import DEFAULT_SEED, evaluate, torch_predictor, validation_set

    loaded = load_model(SHIPPED)
    images, gt = validation_set(DEFAULT_SEED, 500)
    assert evaluate(torch_predictor(loaded.model), images, gt, loaded.input_shape[-1])["mAP50"] >= 0.90


@pytest.mark.slow
def test_shipped_checkpoint_on_onnxruntime_matches_torch(tmp_path):
    pytest.importorskip("faster_coco_eval")
    from attn_export.shapes.evaluate import evaluate, export_for_eval, onnx_predictor, torch_predictor, validation_set

    assert SHIPPED.exists(), f"{SHIPPED} is missing"
    assert SHIPPED.stat().st_size < 8e6
    loaded = load_model(SHIPPED)  # weights-only
    assert loaded.arch == "ShapesDetector"
    assert loaded.meta["classes"] == ["circle", "triangle", "rectangle", "star"]
    images, gt = validation_set(424242, 100)  # a fresh set, seen by neither training nor validation
    size = loaded.input_shape[-1]
    ref = evaluate(torch_predictor(loaded.model), images, gt, size)
    assert ref["mAP50"] > 0.5, ref  # a trained model, not a random one
    path = export_for_eval(loaded.model, (3, size, size), tmp_path / "shapes.onnx")
    ort_metrics = evaluate(onnx_predictor(path), images, gt, size)
    assert abs(ort_metrics["mAP50"] - ref["mAP50"]) <= 0.005
    assert abs(ort_metrics["mAP50_95"] - ref["mAP50_95"]) <= 0.005
