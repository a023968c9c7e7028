"""Pre- and post-processing for the shapes detector, in numpy only (no torch, no OpenCV, no Pillow).

- :func:`letterbox` resizes an image to fit ``size x size`` (aspect kept, bilinear) and pads it with
  grey 114, centred (with ``stride``: to the smallest rectangle of whole strides instead); it returns
  the CHW float32 input in [0, 1], the scale and the padding (:func:`letterbox_u8`: the same as uint8).
- :func:`postprocess` turns the model's (B, N, 4 + C) output (boxes ``x1, y1, x2, y2`` in input
  pixels, then per-class scores in [0, 1]) into per-image detections: a confidence threshold, then
  class-aware greedy NMS, at most ``max_det`` per image, best first.
- :func:`scale_boxes` maps boxes from the letterboxed input back to the original image.

A pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``; a point ``(x, y)`` of the original image is at
``(x * scale + pad_x, y * scale + pad_y)`` in the letterboxed one.
"""

from __future__ import annotations

import numpy as np

PAD_VALUE = 114


def _taps(n_out: int, n_in: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps (half-pixel centres, edge-clamped, like OpenCV's INTER_LINEAR): output pixel centre
    ``p + 0.5`` maps to the input point ``(p + 0.5) / scale``."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def rect_shape(h: int, w: int, size: int, stride: int, min_side: int = 0) -> tuple[int, int]:
    """The rectangular letterbox of an ``h x w`` image (Ultralytics' "rect" inference): the long side at
    ``size``, each side the smallest multiple of ``stride`` that holds the resized image, and ``min_side``
    (the graph's smallest verified side) at least."""
    scale = min(size / h, size / w)
    nh, nw = max(min_side, min(size, round(h * scale))), max(min_side, min(size, round(w * scale)))
    return -(-nh // stride) * stride, -(-nw // stride) * stride


def letterbox_u8(
    img: np.ndarray, size: int = 320, stride: int | None = None, min_side: int = 0
) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Resize ``img`` (H, W, 3) uint8 to fit ``size x size`` (bilinear) and pad with 114, centred.

    Returns ``(CHW uint8 size x size, scale, (pad_x, pad_y))``: 4x smaller than the model input while it
    waits in a queue (:func:`to_input` makes the input of it). The bilinear mix runs in float32 on
    channel planes, whose gathers are cheap, and rounds to the nearest integer. With ``stride`` the
    canvas is the smallest rectangle of whole strides that holds the resized image
    (:func:`rect_shape`) instead of the square: for a graph with free height and width.
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"letterbox: expected an (H, W, 3) image, got shape {img.shape}")
    h, w = img.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = min(size, round(h * scale)), min(size, round(w * scale))
    out_h, out_w = rect_shape(h, w, size, stride, min_side) if stride else (size, size)
    pad_x, pad_y = (out_w - nw) // 2, (out_h - nh) // 2
    out = np.full((3, out_h, out_w), PAD_VALUE, np.uint8)
    if (nh, nw) == (h, w):
        out[:, pad_y : pad_y + nh, pad_x : pad_x + nw] = img.transpose(2, 0, 1)
        return out, float(scale), (int(pad_x), int(pad_y))
    y0, y1, fy = _taps(nh, h, scale)
    x0, x1, fx = _taps(nw, w, scale)
    r0 = np.ascontiguousarray(img[y0].transpose(2, 0, 1))  # (3, nh, w) uint8
    r1 = np.ascontiguousarray(img[y1].transpose(2, 0, 1))
    gx0, gx1 = (1 - fx)[None, None, :], fx[None, None, :]
    # top = r0[x0] * (1 - fx) + r0[x1] * fx, bot likewise, res = top * (1 - fy) + bot * fy: in place
    res = r0[:, :, x0].astype(np.float32)
    res *= gx0
    tmp = r0[:, :, x1].astype(np.float32)
    tmp *= gx1
    res += tmp
    bot = r1[:, :, x0].astype(np.float32)
    bot *= gx0
    tmp = r1[:, :, x1].astype(np.float32)
    tmp *= gx1
    bot += tmp
    res *= (1 - fy)[None, :, None]
    bot *= fy[None, :, None]
    res += bot
    np.rint(res, out=res)  # a convex mix of 0..255: no clipping needed
    out[:, pad_y : pad_y + nh, pad_x : pad_x + nw] = res  # exact: whole numbers in 0..255
    return out, float(scale), (int(pad_x), int(pad_y))


def to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3, S, S) -> the model input, float32 in [0, 1]."""
    return pixels.astype(np.float32) / np.float32(255.0)


def letterbox(img: np.ndarray, size: int = 320, stride: int | None = None) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The model input for one RGB uint8 image (H, W, 3): ``(CHW float32 in [0, 1], scale, (pad_x, pad_y))``
    (``stride``: the rectangular letterbox, see :func:`letterbox_u8`).

    Stack the first elements for a batch: ``np.stack([letterbox(im)[0] for im in images])``.
    """
    pixels, scale, pad = letterbox_u8(img, size, stride)
    return to_input(pixels), scale, pad


def scale_boxes(
    boxes: np.ndarray, scale: float, pad: tuple[float, float], orig_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Map ``x1, y1, x2, y2`` boxes (..., 4) from the letterboxed input to the original image,
    clipped to it when ``orig_hw`` ``(H, W)`` is given."""
    boxes = np.asarray(boxes, dtype=np.float32)
    px, py = pad
    out = (boxes - np.array([px, py, px, py], np.float32)) / np.float32(scale)
    if orig_hw is not None:
        h, w = orig_hw
        out[..., 0::2] = out[..., 0::2].clip(0, w)
        out[..., 1::2] = out[..., 1::2].clip(0, h)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``x1, y1, x2, y2`` boxes: (N, 4) x (M, 4) -> (N, M)."""
    a = a.astype(np.float32, copy=False)
    b = b.astype(np.float32, copy=False)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.45, max_det: int | None = None) -> np.ndarray:
    """Greedy NMS: indices of the kept boxes, highest score first (ties: lower index first).

    A box is dropped when its IoU with a kept, higher-ranked box exceeds ``iou``.
    """
    order = np.argsort(-scores, kind="stable")
    if order.size == 0:
        return order
    over = box_iou(boxes[order], boxes[order]) > iou
    alive = np.ones(order.size, bool)
    keep = []
    limit = order.size if max_det is None else max_det
    i = 0
    while i < order.size and len(keep) < limit:
        keep.append(i)
        alive[i + 1 :] &= ~over[i, i + 1 :]
        nxt = np.flatnonzero(alive[i + 1 :])
        if nxt.size == 0:
            break
        i = i + 1 + int(nxt[0])
    return order[np.asarray(keep, dtype=np.intp)]


def postprocess(
    pred: np.ndarray,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 100,
    multi_label: bool = False,
    max_candidates: int = 3000,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Detections from the model output ``pred`` (B, N, 4 + C) (or (N, 4 + C) for one image).

    Per image: candidates scoring above ``conf`` (the best class of each box, or with
    ``multi_label`` every class above ``conf``), the ``max_candidates`` best of them, class-aware
    greedy NMS at IoU ``iou`` (boxes of different classes never suppress each other), the
    ``max_det`` best kept. Returns, per image, ``(boxes (K, 4) float32 x1 y1 x2 y2 in input pixels,
    scores (K,) float32, class_ids (K,) int64)``, best first.
    """
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim == 2:
        pred = pred[None]
    if pred.ndim != 3 or pred.shape[2] < 5:
        raise ValueError(f"postprocess: expected (B, N, 4 + classes), got shape {pred.shape}")
    out = []
    for p in pred:
        boxes, cls_scores = p[:, :4], p[:, 4:]
        if multi_label:
            idx, cls = np.nonzero(cls_scores > conf)
            scores = cls_scores[idx, cls]
        else:
            cls = cls_scores.argmax(1)
            scores = cls_scores[np.arange(len(cls)), cls]
            idx = np.flatnonzero(scores > conf)
            cls, scores = cls[idx], scores[idx]
        if scores.size > max_candidates:
            top = np.argpartition(-scores, max_candidates - 1)[:max_candidates]
            idx, cls, scores = idx[top], cls[top], scores[top]
        b = boxes[idx]
        # class-aware: shift each class's boxes into its own region so classes never overlap
        span = float(b.max() - b.min()) + 1.0 if b.size else 0.0
        offset = cls[:, None].astype(np.float32) * np.float32(span)
        keep = nms(b + offset, scores, iou, max_det)
        out.append((b[keep].astype(np.float32), scores[keep].astype(np.float32), cls[keep].astype(np.int64)))
    return out
