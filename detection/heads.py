"""Detection heads the service understands, and how it tells them apart.

=============  ======================  ================================================================
head           network output          rows
=============  ======================  ================================================================
``contract``   ``(batch, N, 4 + C)``   ``x1, y1, x2, y2`` in input pixels, then C class scores in [0, 1]
                                       (this project's detectors)
``yolov5``     ``(batch, N, 5 + C)``   ``cx, cy, w, h`` in input pixels, objectness, C class scores
                                       (YOLOv5's ``Detect``: the first output, already decoded)
``yolov8``     ``(batch, 4 + C, N)``   ``cx, cy, w, h`` in input pixels, C class scores, channels first
                                       (Ultralytics YOLOv8 / YOLO11 ``Detect``)
=============  ======================  ================================================================

:func:`decode` turns any of them into the contract's rows (a YOLOv5 box scores ``objectness x class``,
as YOLOv5's own NMS does). :func:`choose_head` picks the head: the one asked for (``--head``), else the
graph's ``head`` metadata (written at export from the model, :func:`describe_module`), else the output
shape with the class count from the metadata's class names, else the shape alone (channels first, far
fewer rows than candidates: YOLOv8), else the contract.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

HEADS = ("contract", "yolov5", "yolov8")
#: the largest stride of the project's detectors, and YOLO's
DEFAULT_STRIDE = 32


class HeadError(ValueError):
    """An output that the chosen head cannot read."""


def _int(d: Any) -> int | None:
    return int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None


def class_count(head: str, shape: Sequence[Any]) -> int | None:
    """Classes in an output of ``shape`` (batch axis included) read as ``head``; None where it is free."""
    if len(shape) != 3:
        raise HeadError(f"a detection output has three axes (batch, ..., ...); this one is {list(shape)}")
    if head == "yolov8":
        c = _int(shape[1])
        return None if c is None else c - 4
    c = _int(shape[2])
    if c is None:
        return None
    return c - (5 if head == "yolov5" else 4)


def choose_head(shape: Sequence[Any], metadata: Mapping[str, Any] | None = None, forced: str | None = None) -> str:
    """The head of an output of ``shape`` (batch first; free axes as None or names), see the module docstring."""
    if forced is not None:
        if forced not in HEADS:
            raise HeadError(f"head {forced!r}: choose one of {', '.join(HEADS)}")
        head = forced
    else:
        meta = metadata or {}
        head = str(meta.get("head") or "")
        if head not in HEADS:
            head = _from_shape(shape, class_names(meta.get("classes") or meta.get("names")))
    n = class_count(head, shape)
    if n is not None and n < 1:
        want = {"yolov8": "(batch, 4 + classes, N)", "yolov5": "(batch, N, 5 + classes)"}.get(
            head, "(batch, N, 4 + classes)"
        )
        raise HeadError(f"the output {list(shape)} holds no class scores as a {head} head {want}")
    return head


def _from_shape(shape: Sequence[Any], names: list[str] | None) -> str:
    if len(shape) != 3:
        return "contract"
    rows, cols = _int(shape[1]), _int(shape[2])
    if names:
        nc = len(names)
        if cols == 5 + nc and rows != 4 + nc:
            return "yolov5"
        if rows == 4 + nc and cols != 4 + nc:
            return "yolov8"
        if cols == 4 + nc:
            return "contract"
    if rows is not None and (cols is None or rows < cols):
        return "yolov8"
    return "contract"


def _xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    half = xywh[..., 2:4] / np.float32(2)
    return np.concatenate([xywh[..., 0:2] - half, xywh[..., 0:2] + half], -1)


def decode(raw: np.ndarray, head: str) -> np.ndarray:
    """A ``head``'s output -> the contract's rows (batch, N, 4 + C): ``x1, y1, x2, y2``, class scores."""
    raw = np.asarray(raw)
    if raw.ndim != 3:
        raise HeadError(f"a detection output has three axes; this one has shape {tuple(raw.shape)}")
    if head == "contract":
        return raw
    raw = raw.astype(np.float32, copy=False)
    if head == "yolov8":
        rows = raw.transpose(0, 2, 1)
        return np.concatenate([_xywh_to_xyxy(rows[..., :4]), rows[..., 4:]], -1)
    if head == "yolov5":
        return np.concatenate([_xywh_to_xyxy(raw[..., :4]), raw[..., 5:] * raw[..., 4:5]], -1)
    raise HeadError(f"head {head!r}: choose one of {', '.join(HEADS)}")


def class_names(value: Any) -> list[str] | None:
    """Class names from a list, a ``{index: name}`` dict (Ultralytics' ``names``), JSON or comma text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, Mapping):
        try:
            value = [value[k] for k in sorted(value, key=lambda k: int(k))]
        except (TypeError, ValueError):
            return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


# ------------------------------------------------------------------------------------------ from the module
def _detect_module(model) -> tuple[str, Any] | None:
    """The model's last YOLO ``Detect``-like module: ``("yolov8", m)`` for one with ``reg_max`` (Ultralytics'
    anchor-free head), ``("yolov5", m)`` for one with ``anchors`` and ``na``."""
    found = None
    for m in model.modules():
        if not hasattr(m, "nc") or not hasattr(m, "stride"):
            continue
        if hasattr(m, "reg_max"):
            found = ("yolov8", m)
        elif hasattr(m, "anchors") and hasattr(m, "na"):
            found = ("yolov5", m)
    return found


def _max_stride(value: Any) -> int | None:
    try:
        values = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    return int(values.max()) if values.size and np.isfinite(values).all() and values.max() >= 1 else None


def describe_module(model, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the export knows of a detector, for the graph's metadata: ``head`` (a YOLO ``Detect`` inside:
    ``yolov5`` or ``yolov8``), ``stride`` (its largest), ``classes`` (the checkpoint's ``meta["classes"]``,
    else the model's ``names``). Keys it cannot tell are left out."""
    out: dict[str, Any] = {}
    names = class_names((meta or {}).get("classes")) or class_names(getattr(model, "names", None))
    found = _detect_module(model)
    if found is not None:
        head, m = found
        out["head"] = head
        stride = _max_stride(getattr(m, "stride", None)) or _max_stride(getattr(model, "stride", None))
        if stride:
            out["stride"] = stride
        if names is None and isinstance(getattr(m, "nc", None), int):
            names = [f"class{i}" for i in range(m.nc)]
    else:
        strides = getattr(model, "strides", None) or getattr(model, "stride", None)
        stride = _max_stride(strides) if strides is not None else None
        if stride:
            out["stride"] = stride
    if names:
        out["classes"] = names
    return out
