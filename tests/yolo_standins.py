"""Small local stand-ins of the YOLO detection heads the service reads, and a detector whose boxes are
known from the picture; written here (random weights), with the upstream attribute names.

- :class:`YoloV5StandIn`: a ``Detect`` with ``nc``, ``no``, ``na``, ``nl``, ``stride``, ``anchors`` (in
  stride units, as YOLOv5 keeps them); eval output ``(decoded (B, N, 5 + nc), raw per level)``, the
  decoded rows ``cx, cy, w, h`` in input pixels, objectness, class scores (sigmoids).
- :class:`YoloV8StandIn`: a ``Detect`` with ``nc``, ``reg_max``, ``stride``, ``no``, box (``cv2``) and class
  (``cv3``) branches and a distribution-focal decoding; eval output ``(decoded (B, 4 + nc, N), feature maps)``.
- :class:`ColourBoxes` (the project's contract, (B, 3, 4 + 3)): candidate ``c`` boxes the pixels where colour
  channel ``c`` exceeds the mean of the other two by 0.5, scoring 1 for class ``c`` when there are any.

All of them take any height and width that are multiples of their stride; :func:`export_free_hw` writes
one as ONNX with free batch, height and width.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


def _grid(ny, nx, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    gy, gx = torch.meshgrid(
        torch.arange(ny, dtype=torch.float32) + offset, torch.arange(nx, dtype=torch.float32) + offset, indexing="ij"
    )
    return gx, gy


def _backbone(widths=(8, 16)) -> nn.ModuleDict:
    """Stride 8 (three 3x3/2 convs) -> widths[0] channels, then stride 16 -> widths[1]."""
    return nn.ModuleDict(
        {
            "p3": nn.Sequential(
                nn.Conv2d(3, 8, 3, 2, 1),
                nn.SiLU(),
                nn.Conv2d(8, 8, 3, 2, 1),
                nn.SiLU(),
                nn.Conv2d(8, widths[0], 3, 2, 1),
                nn.SiLU(),
            ),
            "p4": nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, 2, 1), nn.SiLU()),
        }
    )


class V5Detect(nn.Module):
    """YOLOv5's anchor-based head (its layout and decoding; written here)."""

    def __init__(self, nc: int, anchors, ch, stride) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.stride = torch.tensor(stride, dtype=torch.float32)
        a = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        self.register_buffer("anchors", a / self.stride.view(-1, 1, 1))  # in stride units, like YOLOv5
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs):
        z, raw = [], []
        for i in range(self.nl):
            x = self.m[i](xs[i])
            bs, _, ny, nx = x.shape
            x = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(x)
            y = x.sigmoid()
            gx, gy = _grid(ny, nx)
            grid = torch.stack((gx, gy), -1).view(1, 1, ny, nx, 2)
            xy = (y[..., :2] * 2 - 0.5 + grid) * float(self.stride[i])
            wh = (y[..., 2:4] * 2) ** 2 * (self.anchors[i] * float(self.stride[i])).view(1, self.na, 1, 1, 2)
            z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, self.no))
        return torch.cat(z, 1), raw


class YoloV5StandIn(nn.Module):
    """A tiny YOLOv5-layout detector: ``model[-1]`` is the Detect, ``names`` a list, ``stride`` the Detect's."""

    def __init__(self, nc: int = 3) -> None:
        super().__init__()
        self.backbone = _backbone()
        anchors = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119))
        self.model = nn.Sequential(V5Detect(nc, anchors, (8, 16), (8.0, 16.0)))
        self.stride = self.model[-1].stride
        self.names = [f"v5_{i}" for i in range(nc)]

    def forward(self, x):
        p3 = self.backbone["p3"](x)
        return self.model[-1]([p3, self.backbone["p4"](p3)])


class DFL(nn.Module):
    """The expected value of a softmax over ``reg_max`` bins (Ultralytics' distribution focal loss integral)."""

    def __init__(self, c1: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):  # (B, 4 * c1, N) -> (B, 4, N)
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class V8Detect(nn.Module):
    """Ultralytics' anchor-free head (YOLOv8 / YOLO11 layout and decoding; written here)."""

    def __init__(self, nc: int, ch, stride, reg_max: int = 4) -> None:
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = reg_max
        self.no = nc + 4 * reg_max
        self.stride = torch.tensor(stride, dtype=torch.float32)
        self.cv2 = nn.ModuleList(nn.Conv2d(c, 4 * reg_max, 1) for c in ch)
        self.cv3 = nn.ModuleList(nn.Conv2d(c, nc, 1) for c in ch)
        self.dfl = DFL(reg_max)

    def forward(self, xs):
        boxes, scores, anchors, strides = [], [], [], []
        for i in range(self.nl):
            b = self.cv2[i](xs[i])
            _, _, ny, nx = b.shape
            boxes.append(b.flatten(2))
            scores.append(self.cv3[i](xs[i]).flatten(2))
            gx, gy = _grid(ny, nx, 0.5)
            anchors.append(torch.stack((gx, gy), 0).flatten(1))
            strides.append(torch.ones_like(gx).flatten() * float(self.stride[i]))
        dist = self.dfl(torch.cat(boxes, 2))
        anchor, stride = torch.cat(anchors, 1).unsqueeze(0), torch.cat(strides, 0)
        lt, rb = dist[:, :2], dist[:, 2:]
        xy = (anchor + (rb - lt) / 2) * stride
        wh = (lt + rb) * stride
        return torch.cat((xy, wh, torch.cat(scores, 2).sigmoid()), 1), xs


class YoloV8StandIn(nn.Module):
    """A tiny YOLOv8-layout detector: ``model[-1]`` is the Detect, ``names`` a dict, as Ultralytics keeps them."""

    def __init__(self, nc: int = 5) -> None:
        super().__init__()
        self.backbone = _backbone()
        self.model = nn.Sequential(V8Detect(nc, (8, 16), (8.0, 16.0)))
        self.stride = self.model[-1].stride
        self.names = {i: f"v8_{i}" for i in range(nc)}

    def forward(self, x):
        p3 = self.backbone["p3"](x)
        return self.model[-1]([p3, self.backbone["p4"](p3)])


class ColourBoxes(nn.Module):
    """See the module docstring: (B, 3, H, W) in [0, 1] -> (B, 3, 4 + 3), contract rows."""

    stride = 32

    def forward(self, x):
        _, _, h, w = x.shape
        dom = x - (x.sum(1, keepdim=True) - x) / 2
        mask = dom > 0.5
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, -1) + torch.zeros_like(x)
        ys = torch.arange(h, dtype=torch.float32).view(1, 1, -1, 1) + torch.zeros_like(x)
        big = torch.full_like(x, 1e6)
        x1 = torch.where(mask, xs, big).flatten(2).amin(2)
        y1 = torch.where(mask, ys, big).flatten(2).amin(2)
        x2 = torch.where(mask, xs + 1, -big).flatten(2).amax(2)
        y2 = torch.where(mask, ys + 1, -big).flatten(2).amax(2)
        score = mask.flatten(2).any(2).float()  # (B, 3)
        boxes = torch.stack([x1, y1, x2, y2], -1) * score.unsqueeze(-1)
        return torch.cat([boxes, score.unsqueeze(-1) * torch.eye(3)], -1)


def export_free_hw(model: nn.Module, path: Path, size: int = 320, metadata: dict | None = None) -> Path:
    """``model`` as ONNX with free batch, height and width (the TorchScript exporter: about 0.2 s), the
    first output named ``output``; ``metadata`` written as the graph's metadata properties."""
    import onnx

    model = model.eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, size, size))
    n_out = len(outs[1]) + 1 if isinstance(outs, tuple) else 1
    names = ["output"] + [f"raw{i}" for i in range(n_out - 1)]
    torch.onnx.export(
        model, (torch.rand(1, 3, size, size),), str(path), dynamo=False, input_names=["images"], output_names=names,
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"},
                      **{n: {0: "batch", 2: f"{n}_h", 3: f"{n}_w"} for n in names[1:]}},
        opset_version=17,
    )  # fmt: skip
    graph = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(graph, str(path))
    return path


def v5_decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference decoding of a YOLOv5 output row (N, 5 + nc), float64: boxes xyxy, best score, its class."""
    raw = raw.astype(np.float64)
    cx, cy, w, h = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3]
    scores = raw[:, 5:] * raw[:, 4:5]
    cls = scores.argmax(1)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), scores.max(1), cls


def v8_decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference decoding of a YOLOv8 output (4 + nc, N), float64."""
    raw = raw.astype(np.float64)
    cx, cy, w, h = raw[0], raw[1], raw[2], raw[3]
    scores = raw[4:].T
    cls = scores.argmax(1)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), scores.max(1), cls


def reference(path, data: bytes, head: str, stride: int, conf_rank: int = 15, size: int = 320, conf=None):
    """The graph's raw output on the rect letterbox, decoded in numpy (float64), thresholded at ``conf``, else
    just below the ``conf_rank``-th best score; boxes mapped back to the image, best first. Returns
    ``(conf, boxes, scores, classes)``."""
    import onnxruntime as ort

    from attn_export.detection.postprocess import letterbox_u8, rect_shape

    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    h, w = img.shape[:2]
    pixels, scale, (px, py) = letterbox_u8(img, size, stride)
    assert pixels.shape[1:] == rect_shape(h, w, size, stride) and pixels.shape[1:] != (size, size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"images": (pixels[None].astype(np.float32) / 255)})[0][0]
    boxes, scores, cls = (v5_decode if head == "yolov5" else v8_decode)(raw)
    order = np.argsort(-scores, kind="stable")  # ties (uniform padding) in index order, as the service keeps them
    if conf is None:
        conf = float(scores[order[conf_rank]] + scores[order[conf_rank - 1]]) / 2
    keep = order[scores[order] > conf]
    b = (boxes[keep] - [px, py, px, py]) / scale
    b[:, 0::2] = b[:, 0::2].clip(0, w)
    b[:, 1::2] = b[:, 1::2].clip(0, h)
    return conf, b, scores[keep], cls[keep]
