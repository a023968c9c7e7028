"""The adaptation report names the modules of the ports people use, with what was done and why.

Local stand-ins, written here with upstream's class names, attribute names and habits (not copied):

- timm's ``SelectiveKernel`` (``layers/selective_kernel.py``: ``paths`` of ``ConvNormAct`` whose
  activation lives inside the norm layer, ``BatchNormAct2d``; ``attn`` = ``SelectiveKernelAttn`` with
  ``fc_reduce``/``bn``/``act``/``fc_select``), with and without ``split_input`` (skresnext50 / skresnet18),
  and with ``keep_3x3=False`` (a 5x5 path);
- a YOLOv5 model saved the Ultralytics way: layers of ``model.model`` carrying ``i``/``f``/``type``/``np``
  and routed by them, ODConv2d wrapped Ultralytics-``Conv``-style (``conv``/``bn``/``act``) in the C3
  bottlenecks, an OSVAI ``ODConv2d`` as a layer of its own, and an ``SKAttention`` after ``SPPF``.

Each swap keeps its float64 check (``max_abs_error``); each model's outputs are unchanged after
adapting, on a fresh input of another batch size.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from weights import randomize_

from attn_export import blocks as ours
from attn_export.bench import upstream as official
from attn_export.export import export_onnx
from attn_export.export.adapt import WRAPPER, adapt


# --- timm SelectiveKernel ----------------------------------------------------------------------------------
class BatchNormAct2d(nn.BatchNorm2d):
    """timm's norm + activation in one module: BatchNorm, ``drop``, then ``act``."""

    def __init__(self, channels: int, apply_act: bool = True) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ConvNormAct(nn.Module):
    """timm's ``ConvNormAct``: a bias-free conv with timm's symmetric padding, then ``bn`` (a BatchNormAct2d)."""

    def __init__(self, cin, cout, kernel_size=1, stride=1, dilation=1, groups=1) -> None:
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = BatchNormAct2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class SelectiveKernelAttn(nn.Module):
    def __init__(self, channels: int, num_paths: int = 2, attn_channels: int = 32) -> None:
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, 1, bias=False)

    def forward(self, x):
        x = self.fc_select(self.act(self.bn(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True)))))
        b, c, h, w = x.shape
        return torch.softmax(x.view(b, self.num_paths, c // self.num_paths, h, w), dim=1)


class SelectiveKernel(nn.Module):
    def __init__(
        self, in_channels, out_channels=None, kernel_size=None, stride=1, groups=1, rd_channels=16, keep_3x3=True,
        split_input=True,
    ) -> None:  # fmt: skip
        super().__init__()
        out_channels = out_channels or in_channels
        kernel_size = kernel_size or [3, 5]
        if keep_3x3:
            dilation = [(k - 1) // 2 for k in kernel_size]
            kernel_size = [3] * len(kernel_size)
        else:
            dilation = [1] * len(kernel_size)
        self.num_paths = len(kernel_size)
        self.in_channels, self.out_channels, self.split_input = in_channels, out_channels, split_input
        cin = in_channels // self.num_paths if split_input else in_channels
        self.paths = nn.ModuleList(
            ConvNormAct(cin, out_channels, k, stride, d, groups) for k, d in zip(kernel_size, dilation, strict=True)
        )
        self.attn = SelectiveKernelAttn(out_channels, self.num_paths, rd_channels)

    def forward(self, x):
        if self.split_input:
            parts = torch.split(x, self.in_channels // self.num_paths, 1)
            paths = [op(parts[i]) for i, op in enumerate(self.paths)]
        else:
            paths = [op(x) for op in self.paths]
        x = torch.stack(paths, dim=1)
        return torch.sum(x * self.attn(x), dim=1)


class SKBottleneck(nn.Module):
    """timm's ``SelectiveKernelBottleneck``: 1x1 -> SelectiveKernel (conv2) -> 1x1, residual."""

    def __init__(self, channels: int, width: int, sk: dict) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, width, 1)
        self.conv2 = SelectiveKernel(width, width, **sk)
        self.conv3 = ConvNormAct(width, channels, 1)

    def forward(self, x):
        return torch.relu(x + self.conv3(self.conv2(self.conv1(x))))


def _x(batch: int, channels: int, seed: int, size: int = 12) -> torch.Tensor:
    return torch.randn((batch, channels, size, size), generator=torch.Generator().manual_seed(seed))


def _check_unchanged(model, original, channels, seed):
    x = _x(3, channels, seed)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


def _sk_models():
    yield "conv2", SKBottleneck(32, 32, dict(groups=8, split_input=False))  # skresnext50-style
    yield "1", nn.Sequential(ConvNormAct(32, 32), SelectiveKernel(32, stride=2, groups=4, split_input=False), nn.ReLU())


@pytest.mark.parametrize("which", [0, 1])
def test_timm_selective_kernel_becomes_skconv(which):
    path, model = list(_sk_models())[which]
    model = randomize_(model, seed=1).eval()
    original = copy.deepcopy(model)
    model, records = adapt(model, _x(2, 32, seed=2))
    (rec,) = records
    assert (rec.path, rec.foreign, rec.action) == (path, "SelectiveKernel", "adapted")
    assert rec.adapter == "SelectiveKernel (timm)"
    assert isinstance(model.get_submodule(path), ours.SKConv)
    assert rec.max_abs_error is not None and rec.max_abs_error <= 1e-9  # the float64 check of the swap
    assert "SKConv(channels=32, branches=2)" in rec.reason
    _check_unchanged(model, original, 32, seed=3)


@pytest.mark.parametrize(
    ("sk", "why"),
    [
        (dict(split_input=True), "split_input=True"),  # skresnet18
        (dict(split_input=False, keep_3x3=False), "path 1 is a (5, 5) conv"),
    ],
)
def test_timm_selective_kernel_left_alone_says_why(sk, why):
    model = randomize_(SKBottleneck(32, 32, sk), seed=4).eval()
    original = copy.deepcopy(model)
    block = model.conv2
    model, records = adapt(model, _x(2, 32, seed=5))
    (rec,) = records
    assert (rec.path, rec.foreign, rec.action) == ("conv2", "SelectiveKernel", "left")
    assert rec.adapter == "SelectiveKernel (timm)"
    assert why in rec.reason and "standard ops" in rec.reason
    assert model.conv2 is block
    _check_unchanged(model, original, 32, seed=6)


def test_a_selective_kernel_whose_forward_differs_is_left():
    class SelectiveKernelMax(SelectiveKernel):  # same layout, another function: max instead of the weighted sum
        def forward(self, x):
            x = torch.stack([op(x) for op in self.paths], dim=1)
            return torch.amax(x * self.attn(x), dim=1)

    model = nn.Sequential(nn.Conv2d(16, 16, 1), SelectiveKernelMax(16, split_input=False), nn.ReLU())
    model = randomize_(model, seed=7).eval()
    _, records = adapt(model, _x(2, 16, seed=8))
    (rec,) = records
    assert rec.action == "left" and "not exact in float64" in rec.reason


# --- a YOLOv5 model saved the Ultralytics way ---------------------------------------------------------------
class Conv(nn.Module):
    """Ultralytics ``Conv``: conv -> bn -> SiLU."""

    def __init__(self, c1, c2, k=1, s=1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ODConv(Conv):
    """The YOLO-improvement habit: an Ultralytics ``Conv`` whose conv is OSVAI's ``ODConv2d``."""

    def __init__(self, c1, c2, k=1, s=1) -> None:
        super().__init__(c1, c2, k, s)
        self.conv = official.ODConv2d(c1, c2, k, s, padding=k // 2, reduction=0.25)


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, e=0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = ODConv(c_, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c1, c2, n=1) -> None:
        super().__init__()
        c_ = c2 // 2
        self.cv1, self.cv2, self.cv3 = Conv(c1, c_), Conv(c1, c_), Conv(2 * c_, c2)
        self.m = nn.Sequential(*(Bottleneck(c_, c_) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c1, c1 // 2), Conv(c1 // 2 * 4, c2)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class SKAttention(official.SKConv):  # the External-Attention-pytorch name of the Linear-fc SK port
    pass


class Concat(nn.Module):
    def forward(self, x):
        return torch.cat(x, 1)


class DetectionModel(nn.Module):
    """Ultralytics' ``DetectionModel``: ``model`` is a Sequential whose layers carry ``i``, ``f``, ``type`` and
    ``np`` (set by ``parse_model``) and are routed by them; ``save`` lists the outputs kept for later layers."""

    def __init__(self) -> None:
        super().__init__()
        spec = [
            (-1, Conv(3, 32, 3, 2)),
            (-1, C3(32, 32)),
            (-1, official.ODConv2d(32, 32, 3, padding=1, reduction=0.25)),  # a layer of its own
            (-1, SPPF(32, 32)),
            (-1, SKAttention(32, G=8)),  # after SPPF
            ([-1, 1], Concat()),
            (-1, nn.Conv2d(64, 8, 1)),
        ]
        layers = []
        for i, (f, m) in enumerate(spec):
            m.i, m.f, m.type, m.np = i, f, f"models.common.{type(m).__name__}", sum(p.numel() for p in m.parameters())
            layers.append(m)
        self.model = nn.Sequential(*layers)
        self.save = [1]

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def _yolo():
    return randomize_(DetectionModel(), seed=11).eval()


def test_ultralytics_model_lists_every_port_module_and_wrapper():
    model = _yolo()
    original = copy.deepcopy(model)
    model, records = adapt(model, _x(2, 3, seed=12, size=16))
    got = [(r.path, r.foreign, r.action, r.adapter) for r in records]
    assert got == [
        ("model.1", "C3", "left", WRAPPER),
        ("model.1.m.0.cv2", "ODConv", "left", WRAPPER),
        ("model.1.m.0.cv2.conv", "ODConv2d", "adapted", "ODConv2d (OSVAI)"),
        ("model.2", "ODConv2d", "adapted", "ODConv2d (OSVAI)"),
        ("model.4", "SKAttention", "left", "SKConv (SKNet-style, Linear fc)"),
    ]
    by_path = {r.path: r for r in records}
    assert "Ultralytics layer 1" in by_path["model.1"].reason
    assert "ODConv2d at 'model.1.m.0.cv2.conv'" in by_path["model.1"].reason
    assert "Conv-style wrapper" in by_path["model.1.m.0.cv2"].reason
    assert "different function" in by_path["model.4"].reason
    for r in records:
        if r.action == "adapted":
            assert r.max_abs_error is not None and r.max_abs_error <= 1e-9
    # the swapped layer keeps the attributes the model routes by
    layer = model.model[2]
    assert isinstance(layer, ours.ODConv2d)
    assert (layer.i, layer.f, layer.type) == (2, -1, "models.common.ODConv2d")
    assert "i, f, type, np carried over" in by_path["model.2"].reason
    x = _x(3, 3, seed=13, size=16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


def test_ultralytics_model_exports_with_its_report(tmp_path):
    result = export_onnx(_yolo(), tmp_path / "yolo.onnx", (3, 16, 16), batch=(1, 2, 3), seed=14)
    assert result.ok, result.report.table() if result.report else result.to_dict()
    actions = {(r["path"], r["action"]) for r in result.to_dict()["adapted"]}
    assert {("model.2", "adapted"), ("model.1.m.0.cv2.conv", "adapted"), ("model.4", "left")} <= actions
