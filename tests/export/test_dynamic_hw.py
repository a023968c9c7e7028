"""Dynamic image sizes: ``export_onnx(dynamic_hw=(min, opt, max))`` and ``--dynamic-hw MIN:OPT:MAX``.

The graph's input is ``(batch, C, height, width)``; the verification runs at MIN, OPT, MAX, an odd and
a non-square size with one report row per size; onnxruntime then runs the graph at sizes the
verification never used, against a float64 copy of the model. A walk over the graph checks that no
size is baked into a constant that shapes a tensor (Reshape, Expand, Slice, Pad, Resize, ...): it finds
such constants in the same model exported at a fixed size, so it can fail. Models that cannot take a
free size (a position embedding of fixed size, as VOLO's; a flatten into a fixed Linear; a model
that needs square inputs) keep their size, and the export says why in one line; a model whose sides
must be multiples of its stride (a feature pyramid) is verified at such multiples.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from weights import randomize_

from attn_export.blocks.mixnet import MixedNet
from attn_export.cli import main
from attn_export.export import ExportError, export_onnx
from attn_export.export.profile import parse_hw, verify_sizes

# The inputs of each op that take a shape, sizes, starts/ends or pads.
SHAPE_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "Slice": (1, 2),
    "Pad": (1,),
    "Resize": (3,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Range": (0, 1),
    "Col2Im": (1, 2),
    "Split": (1,),
}
# Ops a constant passes through on its way into a shape (Concat([batch, 2, 49, 23, 23]) and the like).
PASS_THROUGH = {"Concat", "Cast", "Unsqueeze", "Squeeze", "Identity"}


def baked_sizes(model: onnx.ModelProto, sizes: set[int]) -> list[tuple[str, str, list[int]]]:
    """``(op, node, values)`` for each shape-taking input fed by constants that equal one of ``sizes``."""
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {}
    for node in graph.node:
        for out in node.output:
            producer[out] = node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)

    def values(name: str, depth: int = 0) -> list[int]:
        if name in consts:
            return [int(v) for v in consts[name].ravel()] if consts[name].dtype.kind in "iu" else []
        node = producer.get(name)
        if node is None or node.op_type not in PASS_THROUGH or depth > 8:
            return []  # computed from the input's shape at run time: not baked
        return [v for i in node.input if i for v in values(i, depth + 1)]

    found = []
    for node in graph.node:
        for idx in SHAPE_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx]:
                hit = sorted({v for v in values(node.input[idx]) if v in sizes})
                if hit:
                    found.append((node.op_type, node.name, hit))
    return found


def size_derived(model: nn.Module, size: tuple[int, int], other: tuple[int, int], channels: int = 3) -> set[int]:
    """Every dimension of every module output that depends on the input size (it differs between a run
    at ``size`` and one at ``other``), at ``size``, and the products of two of them (flattened maps)."""

    def dims(hw):
        seen = []
        hooks = [
            m.register_forward_hook(
                lambda m, a, o: seen.append(tuple(o.shape)) if isinstance(o, torch.Tensor) else None
            )
            for m in model.modules()
        ]
        with torch.no_grad():
            model(torch.randn(1, channels, *hw))
        for h in hooks:
            h.remove()
        return seen

    changed = {x for p, q in zip(dims(size), dims(other), strict=True) for x, y in zip(p, q, strict=False) if x != y}
    changed |= set(size)
    return changed | {x * y for x in changed for y in changed}


# --- the five blocks in one network ------------------------------------------------------------------------
HW = (24, 45, 64)  # OPT 45 (odd) -> 23 -> 12: sizes no channel count or kernel size of the net equals


@pytest.fixture(scope="module")
def mixednet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dyn")
    model = randomize_(MixedNet(num_classes=10, width=16), 4).eval()
    said: list[str] = []
    dynamic = export_onnx(
        model,
        folder / "dyn.onnx",
        (3, 45, 45),
        batch=(1, 2, 2),
        seed=0,
        dynamic_hw=HW,
        progress=lambda s, m: said.append(m),
    )
    static = export_onnx(model, folder / "static.onnx", (3, 45, 45), verify=False)
    return model, dynamic, static, said


def test_graph_input_is_batch_c_height_width(mixednet):
    _, result, _, said = mixednet
    assert result.ok, result.report.table()
    assert result.dynamic_hw == HW and result.hw_refused == ""
    graph = onnx.load(str(result.path))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["dynamic_hw"]) == {"min": 24, "opt": 45, "max": 64, "multiple_of": 1}
    data = result.to_dict()
    assert data["dynamic_hw"] == {"min": 24, "opt": 45, "max": 64, "multiple_of": 1}
    assert data["input"]["shape"] == ["batch", 3, "height", "width"]
    assert any("at sizes 24x24, 45x45, 64x64, 24x45" in m for m in said)


def test_one_report_row_per_size(mixednet):
    _, result, _, _ = mixednet
    report = result.report
    sizes = [tuple(s) for s in report.sizes]
    assert sizes == [(1, 45, 45), (2, 45, 45), (1, 24, 24), (1, 64, 64), (1, 24, 45)]
    assert any(h % 2 and w % 2 for _, h, w in sizes) and any(h != w for _, h, w in sizes)  # odd, non-square
    assert [(c.batch, c.height, c.width) for c in report.outputs] == sizes
    for block in ["involution", "odconv", "skconv", "outlook.block", "gsop"]:
        assert [(c.batch, c.height, c.width) for c in report.blocks if c.name == block] == sizes
    assert report.to_dict()["sizes"] == [list(s) for s in sizes]
    assert "45x45" in report.table() and "24x45" in report.table()


@pytest.mark.parametrize("hw", [(31, 57), (64, 26), (33, 33)])
def test_graph_runs_at_sizes_never_verified(mixednet, hw):
    model, result, _, _ = mixednet
    x = np.random.default_rng(hw[0]).standard_normal((3, 3, *hw), dtype=np.float32)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x})
    m64 = MixedNet(num_classes=10, width=16).double()
    m64.load_state_dict(model.state_dict())
    m64.eval()
    with torch.no_grad():
        want = m64(torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_no_size_baked_into_a_constant(mixednet):
    model, result, static, _ = mixednet
    sizes = size_derived(model, (45, 45), (37, 37))
    assert {45, 23, 12, 23 * 23, 12 * 12} <= sizes
    # the same model exported at a fixed size has its sizes in Reshape/Slice constants: the walk sees them
    assert baked_sizes(onnx.load(str(static.path)), sizes)
    assert baked_sizes(onnx.load(str(result.path)), sizes) == []


# --- models that cannot take a free size ---------------------------------------------------------------------
class PosEmbed(nn.Module):
    """VOLO-style: patch embedding, then a learned position embedding of fixed size."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 8, 8, 8))

    def forward(self, x):
        return (self.patch_embed(x) + self.pos_embed).mean((2, 3))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class SquareOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + y.transpose(2, 3)


@pytest.mark.parametrize(
    "model, reason",
    [
        (PosEmbed(), "module '<model>' (PosEmbed): RuntimeError: The size of tensor a"),
        (FlattenLinear(), "module 'fc' (Linear): RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
        (SquareOnly(), "the model needs square inputs (height == width): module '<model>' (SquareOnly): Runtime"),
    ],
    ids=["pos_embed", "flatten_linear", "square_only"],
)
def test_fixed_size_models_stay_static_and_say_why(model, reason, tmp_path):
    said: list[str] = []
    result = export_onnx(
        model.eval(), tmp_path / "m.onnx", (3, 32, 32), dynamic_hw=(16, 32, 48), progress=lambda s, m: said.append(m)
    )
    assert result.ok
    assert result.dynamic_hw is None and result.hw_refused.startswith(reason)
    assert "\n" not in result.hw_refused
    assert f"height and width stay static at 32x32: {result.hw_refused}" in said
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 32, 32]
    data = result.to_dict()
    assert data["dynamic_hw"] is None and data["dynamic_hw_refused"] == result.hw_refused
    assert all(s[1:] == [None, None] for s in result.report.sizes)


class Pyramid(nn.Module):
    """YOLO-neck-style: a stride-4 map upsampled and concatenated with the stride-2 map."""

    def __init__(self) -> None:
        super().__init__()
        self.down1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.down2 = nn.Conv2d(8, 8, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = self.down1(x)
        return self.head(torch.cat([a, self.up(self.down2(a))], 1))


def test_sizes_in_multiples_of_the_stride(tmp_path):
    said: list[str] = []
    model = randomize_(Pyramid(), 1).eval()
    result = export_onnx(
        model,
        tmp_path / "p.onnx",
        (3, 32, 32),
        batch=(1, 1, 2),
        dynamic_hw=(16, 40, 64),
        progress=lambda s, m: said.append(m),
    )
    assert result.ok and result.hw_multiple == 4 and result.to_dict()["dynamic_hw"]["multiple_of"] == 4
    sizes = [tuple(s[1:]) for s in result.report.sizes]
    assert all(h % 4 == 0 and w % 4 == 0 for h, w in sizes)
    assert any((h // 4) % 2 for h, _ in sizes)  # an odd multiple of 4: a model needing 8 would fail there
    assert any("must be multiples of 4" in m for m in said)
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 52), dtype=np.float32)
    (got,) = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-3)


def test_range_the_model_cannot_run_in_part(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 7), nn.ReLU()).eval()  # no padding: needs sides of 7 or more
    with pytest.raises(ExportError, match=r"^--dynamic-hw 4:16:32: the model fails at 4x4 \(module '0' \(Conv2d\)"):
        export_onnx(model, tmp_path / "k.onnx", (3, 16, 16), dynamic_hw=(4, 16, 32))
    assert list(tmp_path.iterdir()) == []


# --- arguments and the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["8:4:16", "1:4:8", "16:16:16", "8:16", "a:b:c", "8,16,32"])
def test_parse_hw_rejects(text):
    with pytest.raises(ExportError, match=r"^--dynamic-hw: expected MIN:OPT:MAX"):
        parse_hw(text)


def test_verify_sizes():
    assert verify_sizes((16, 32, 48)) == [(16, 16), (32, 32), (48, 48), (33, 33), (16, 32)]
    assert verify_sizes((32, 32, 64)) == [(32, 32), (64, 64), (33, 33), (32, 64)]
    assert verify_sizes((60, 320, 650), 32) == [(64, 64), (320, 320), (640, 640), (352, 352), (64, 320)]
    with pytest.raises(ExportError, match="fewer than two multiples of 32"):
        verify_sizes((40, 50, 60), 32)


def test_cli_dynamic_hw(tmp_path, capsys):
    path = tmp_path / "p.pt"
    torch.save(randomize_(Pyramid(), 2).eval(), path)
    report = tmp_path / "r.json"
    argv = [str(path), "--trust-checkpoint", "--input-shape", "3,32,32", "--dynamic-hw", "16:32:48", "--batch", "1:1:2"]
    assert main([*argv, "--report", str(report)]) == 0
    out, err = capsys.readouterr()
    assert "dynamic batch, height and width 16..48" in out
    assert "must be multiples of 4" in err
    data = json.loads(report.read_text())
    assert data["dynamic_hw"] == {"min": 16, "opt": 32, "max": 48, "multiple_of": 4}
    assert data["verification"]["sizes"][0] == [1, 32, 32]

    torch.save(PosEmbed().eval(), path)
    assert main([str(path), "--trust-checkpoint", "--input-shape", "3,32,32", "--dynamic-hw", "16:32:48"]) == 0
    out, err = capsys.readouterr()
    stay = [line for line in err.splitlines() if "stay static" in line]
    assert len(stay) == 1 and "PosEmbed" in stay[0]
    assert "height and width static" in out

    assert main([str(path), "--trust-checkpoint", "--input-shape", "3,32,32", "--dynamic-hw", "48:32:16"]) == 2
    _, err = capsys.readouterr()
    assert "attn-export: error: --dynamic-hw: expected MIN:OPT:MAX" in err


def test_plugin_graph_with_free_size(tmp_path):
    """Target trt: the plugin graph is verified at every size too (the plugin nodes by their numpy references)."""
    from attn_export.blocks import Involution2d, ODConv2d

    model = randomize_(
        nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), Involution2d(16, 3, group_channels=8), ODConv2d(16, 16, 3, padding=1)),
        5,
    ).eval()
    result = export_onnx(model, tmp_path / "p.onnx", (3, 16, 16), batch=(1, 2, 2), target="trt", dynamic_hw=(8, 16, 24))
    assert result.ok and result.dynamic_hw == (8, 16, 24)
    assert result.plugins == {"AttnExportInvolution2d": 1, "AttnExportDynamicConv2d": 1}
    assert [tuple(s) for s in result.report.sizes] == [
        (1, 16, 16),
        (2, 16, 16),
        (1, 8, 8),
        (1, 24, 24),
        (1, 17, 17),
        (1, 8, 16),
    ]
    assert all(c.passed for c in result.report.blocks) and len(result.report.blocks) == 2 * 6
