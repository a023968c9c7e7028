"""Letterbox / un-letterbox and class-aware NMS (against a plain-loop reference)."""

from __future__ import annotations

import numpy as np
import pytest

from attn_export.detection.postprocess import (
    PAD_VALUE,
    box_iou,
    letterbox,
    letterbox_u8,
    nms,
    postprocess,
    scale_boxes,
)


@pytest.mark.parametrize("hw", [(480, 256), (256, 480), (320, 320), (301, 457), (100, 90)])
def test_letterbox_shape_scale_and_padding(hw):
    h, w = hw
    img = np.full((h, w, 3), 200, np.uint8)
    x, scale, (px, py) = letterbox(img, 320)
    assert x.shape == (3, 320, 320) and x.dtype == np.float32
    assert scale == pytest.approx(min(320 / h, 320 / w))
    nh, nw = round(h * scale), round(w * scale)
    assert (px, py) == ((320 - nw) // 2, (320 - nh) // 2)
    inside = x[:, py : py + nh, px : px + nw]
    assert np.allclose(inside, 200 / 255)
    pad = np.ones((320, 320), bool)
    pad[py : py + nh, px : px + nw] = False
    assert np.allclose(x[:, pad], PAD_VALUE / 255)


def test_letterbox_round_trip_of_boxes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(200, 700, 2))
        xs, ys = np.sort(rng.uniform(0, w, (10, 2)), 1), np.sort(rng.uniform(0, h, (10, 2)), 1)
        boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)
        _, scale, (px, py) = letterbox_u8(np.zeros((h, w, 3), np.uint8), 320)
        fwd = boxes * scale + np.array([px, py, px, py])
        back = scale_boxes(fwd, scale, (px, py), (h, w))
        assert np.allclose(back, boxes, atol=1e-3)


def test_letterbox_keeps_content_aligned():
    """A bright rectangle drawn on an image is found where scale_boxes says, within a pixel."""
    img = np.zeros((300, 450, 3), np.uint8)
    x0, y0, x1, y1 = 100, 40, 260, 200
    img[y0:y1, x0:x1] = 255
    out, scale, pad = letterbox_u8(img, 320)
    ys, xs = np.nonzero(out[0] > 127)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    back = scale_boxes(found, scale, pad, img.shape[:2])
    assert np.abs(back - [x0, y0, x1, y1]).max() <= 1.0 / scale + 1e-3


def test_scale_boxes_clips():
    out = scale_boxes(np.array([[-10.0, -5.0, 400.0, 330.0]]), 1.0, (0, 0), (300, 350))
    assert out.tolist() == [[0.0, 0.0, 350.0, 300.0]]


def _naive_nms(boxes, scores, classes, iou, max_det):
    """Reference: per class, repeatedly take the best remaining box and drop those overlapping it."""

    def iou1(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    kept = []
    for c in set(classes.tolist()):
        rest = sorted((i for i in range(len(boxes)) if classes[i] == c), key=lambda i: -scores[i])
        while rest:
            best = rest.pop(0)
            kept.append(best)
            rest = [i for i in rest if iou1(boxes[best], boxes[i]) <= iou]
    kept.sort(key=lambda i: -scores[i])
    return kept[:max_det]


def _random_boxes(rng, n, classes):
    centre = rng.uniform(0, 200, (n, 2))
    size = rng.uniform(5, 60, (n, 2))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32), rng.integers(0, classes, n)


@pytest.mark.parametrize("seed", range(6))
def test_nms_matches_a_naive_loop(seed):
    rng = np.random.default_rng(seed)
    n, c = 300, 4
    boxes, scores, classes = _random_boxes(rng, n, c)
    pred = np.zeros((1, n, 4 + c), np.float32)
    pred[0, :, :4] = boxes
    pred[0, np.arange(n), 4 + classes] = scores
    for iou, max_det in ((0.45, 100), (0.7, 1000), (0.2, 5)):
        got_boxes, got_scores, got_cls = postprocess(pred, conf=0.0, iou=iou, max_det=max_det)[0]
        ref = _naive_nms(boxes, scores, classes, iou, max_det)
        assert np.array_equal(got_scores, scores[ref])
        assert np.array_equal(got_boxes, boxes[ref])
        assert np.array_equal(got_cls, classes[ref])


def test_nms_single_class_and_box_iou():
    rng = np.random.default_rng(7)
    boxes, scores, _ = _random_boxes(rng, 120, 1)
    keep = nms(boxes, scores, 0.5)
    assert sorted(keep.tolist()) == sorted(_naive_nms(boxes, scores, np.zeros(120, int), 0.5, 10**6))
    iou = box_iou(boxes[keep], boxes[keep])
    np.fill_diagonal(iou, 0)
    assert iou.max() <= 0.5
    assert len(nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))) == 0


def test_postprocess_batch_thresholds_and_max_det():
    rng = np.random.default_rng(1)
    pred = np.zeros((3, 50, 6), np.float32)
    for b in range(3):
        boxes, _, _ = _random_boxes(rng, 50, 1)
        pred[b, :, :4] = boxes
        pred[b, :, 4:] = rng.random((50, 2))
    pred[2, :, 4:] = 0.01  # nothing above the threshold
    out = postprocess(pred, conf=0.3, iou=0.5, max_det=7)
    assert len(out) == 3
    for b, (boxes, scores, cls) in enumerate(out[:2]):
        assert len(boxes) <= 7 and boxes.shape[1:] == (4,)
        assert (scores > 0.3).all() and np.all(np.diff(scores) <= 0)
        best = pred[b, :, 4:].max(1)
        assert scores[0] == best.max()
        assert set(cls.tolist()) <= {0, 1}
    assert all(len(a) == 0 for a in out[2])
    multi = postprocess(pred[:1], conf=0.3, iou=0.5, max_det=1000, multi_label=True)[0]
    single = postprocess(pred[:1], conf=0.3, iou=0.5, max_det=1000)[0]
    assert len(multi[0]) >= len(single[0])
