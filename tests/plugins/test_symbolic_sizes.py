"""The lowerings with a symbolic height and width (``--dynamic-hw``): exported once, run at many sizes.

Every dynamic-kernel op (involution's shifted slices, ODConv's per-sample Scan, outlook's
``(2k-1)^2`` aggregation and its stride > 1 fold) is exported once with the batch, height and width
symbolic, then run on onnxruntime at sizes unlike the traced one (odd, non-square, not multiples of
the stride) and compared with the op's float64 reference. The ``trt`` target's plugin graph runs on
``onnx.reference`` with the numpy plugin references at several sizes. The ``F.fold``/``F.unfold``
rewrites and the blocks (GSoP and SKConv too) export the same way.

"Nothing bakes a size into a constant" is checked twice: the graph's outputs keep symbolic spatial
dims, and exports traced at two different sizes are the same graph (every node, attribute and
constant), so nothing of the traced size is in it.

The weights the ops take are computed inside the exported module from an input of the image's size
(a pad and a strided slice, as the blocks compute them with a strided convolution), so that their
spatial dims are the exporter's own expressions of H and W, as in a real model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx.reference import ReferenceEvaluator
from onnx_helpers import ConvTranspose, quiet_export, session
from torch import nn

from attn_export.plugins import onnx_translation_table, reference_ops
from attn_export.plugins.dynamic_conv.op import reference as dynamic_conv_ref
from attn_export.plugins.involution.op import reference as involution_ref
from attn_export.plugins.outlook import onnx_lowering as outlook_lowering
from attn_export.plugins.outlook.op import reference as outlook_ref

ATOL = 1e-4
#: (batch, H, W) the exported graphs run at: odd, non-square, and not multiples of 2 or 3.
SIZES = ((1, 13, 10), (2, 7, 17), (3, 16, 11))
TRACED = (2, 9, 8)  # the size every export is traced at
OTHER_TRACE = (3, 11, 14)  # a second trace: the graph must not change


def export(module: nn.Module, args: tuple, table: dict, spatial=None, optimize: bool = False):
    """``module(*args)`` exported with a symbolic batch, height and width. ``spatial[i]``: True where the
    last two axes of input ``i`` are the image's height and width, an ``(h, w)`` pair of axes, or False
    (only the batch is symbolic); default True for every input. ``optimize``: run the exporter's graph
    optimizer (as the export pipeline does; off by default here, where only the lowering is tested and
    the optimizer would double the export time)."""
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=5, max=96)
    width = torch.export.Dim("width", min=5, max=96)
    spatial = spatial or (True,) * len(args)

    def axes(a, sp):
        if sp is False:
            return {0: batch}
        h, w = (a.dim() - 2, a.dim() - 1) if sp is True else sp
        return {0: batch, h: height, w: width}

    dynamic = tuple(axes(a, sp) for a, sp in zip(args, spatial, strict=True))
    return quiet_export(module, args, dynamic, table, optimize)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def signature(model) -> list:
    """Every node (subgraphs too) with its attributes and constant values, and every initializer: what
    would differ if a traced size were baked into the graph."""
    out = []
    for node in all_nodes(model.graph):
        attrs = []
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                continue
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, onnx.TensorProto):
                value = onnx.numpy_helper.to_array(value).tolist()
            attrs.append((a.name, value))
        out.append((node.op_type, sorted(attrs, key=lambda kv: kv[0])))
    out += [(i.name, onnx.numpy_helper.to_array(i).tolist()) for i in model.graph.initializer]
    return out


def check_symbolic(model, axes: tuple[int, int] | None = None) -> None:
    """Every output keeps a symbolic batch, height and width (no traced size fixed on the way);
    ``axes``: the outputs' height and width axes (default: the last two)."""
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        for axis in (0, *(axes or (len(dims) - 2, len(dims) - 1))):
            assert dims[axis].dim_param and not dims[axis].HasField("dim_value"), (value.name, axis, dims)


def floats(inputs) -> tuple:
    return tuple(t.float() for t in inputs)


def check_same_graph_at_another_trace(module, make_inputs, table, spatial=None) -> None:
    """Exports traced at two sizes (optimized, as the pipeline exports) are the same graph."""
    a = export(module, floats(make_inputs(*TRACED, seed=0)), table, spatial, optimize=True)
    b = export(module, floats(make_inputs(*OTHER_TRACE, seed=0)), table, spatial, optimize=True)
    assert signature(a) == signature(b), "the graph depends on the size it was traced at"
    return a


def run_sizes(run, make_inputs, reference, atol=ATOL) -> None:
    for b, h, w in SIZES:
        inputs = make_inputs(b, h, w, seed=b * 100 + h)
        expected = np.asarray(reference(*inputs))
        got = run(inputs)
        assert got.shape == expected.shape, ((b, h, w), got.shape, expected.shape)
        err = float(np.abs(got.astype(np.float64) - expected).max())
        assert err < atol, f"size {b}x{h}x{w}: max error {err:.2e}"


def ort_runner(model):
    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    dtype = torch.float64 if sess.get_inputs()[0].type == "tensor(double)" else torch.float32
    return lambda inputs: sess.run(None, {n: t.to(dtype).numpy() for n, t in zip(names, inputs, strict=True)})[0]


def reference_runner(model):
    ev = ReferenceEvaluator(model, new_ops=reference_ops())
    names = list(ev.input_names)
    return lambda inputs: ev.run(None, {n: t.float().numpy() for n, t in zip(names, inputs, strict=True)})[0]


def window(src: torch.Tensor, k: int, s: int, p: int, d: int = 1) -> torch.Tensor:
    """``src``'s last two axes cut to the ``k x k`` window grid (stride s, padding p, dilation d): a
    tensor whose spatial size is the op's output size, computed from H and W as a model computes it."""
    r = d * (k - 1)
    h, w = src.shape[-2], src.shape[-1]
    return F.pad(src, (p, p, p, p))[..., : h + 2 * p - r : s, : w + 2 * p - r : s]


# ------------------------------------------------------------------------------------------ the ops
class Involution(nn.Module):
    def __init__(self, groups: int, k: int, s: int, p: int, d: int) -> None:
        super().__init__()
        self.groups, self.geometry = groups, (k, s, p, d)

    def forward(self, x, src):
        k, s, p, d = self.geometry
        wt = window(src, k, s, p, d)
        wt = wt.reshape(wt.shape[0], self.groups, k * k, wt.shape[2], wt.shape[3])
        return torch.ops.attn_export.involution2d(x, wt, k, s, p, d)


def involution_case(c, g, k, s, p, d):
    def make_inputs(b, h, w, seed):
        return randn(b, c, h, w, seed=seed), randn(b, g * k * k, h, w, seed=seed + 1) / k

    def reference(x, src):
        wt = window(src, k, s, p, d)
        return involution_ref(x, wt.reshape(wt.shape[0], g, k * k, *wt.shape[2:]), k, s, p, d).numpy()

    return Involution(g, k, s, p, d), make_inputs, reference, (True, True)


class DynamicConv(nn.Module):
    def __init__(self, s, p, d, g: int) -> None:
        super().__init__()
        self.geometry = (list(s), list(p), list(d), g)

    def forward(self, x, weight):
        return torch.ops.attn_export.dynamic_conv2d(x, weight, *self.geometry)


def dynamic_conv_case(cin, cout, kh, kw, s, p, d, g):
    def make_inputs(b, h, w, seed):
        fan_in = (cin // g) * kh * kw
        return randn(b, cin, h, w, seed=seed), randn(b, cout, cin // g, kh, kw, seed=seed + 1) * fan_in**-0.5

    def reference(x, wt):
        return dynamic_conv_ref(x, wt, list(s), list(p), list(d), g).numpy()

    return DynamicConv(s, p, d, g), make_inputs, reference, (True, False)


class Outlook(nn.Module):
    def __init__(self, heads: int, k: int, p: int, s: int) -> None:
        super().__init__()
        self.heads, self.geometry = heads, (k, p, s)

    def forward(self, v, src):
        k, p, s = self.geometry
        return torch.ops.attn_export.outlook_aggregate(v, outlook_attn(src, self.heads, k, p, s), k, p, s)


def outlook_attn(src, heads, k, p, s):
    """(B, heads*k^4, H, W) -> attn (B, heads, h*w, k*k, k*k) on the window grid, softmaxed."""
    a = window(src, k, s, p)  # B, heads*k^4, h, w
    a = a.reshape(a.shape[0], heads, k**4, -1).transpose(2, 3)
    return a.reshape(a.shape[0], heads, a.shape[2], k * k, k * k).softmax(-1)


def outlook_case(c, heads, k, p, s):
    def make_inputs(b, h, w, seed):
        return randn(b, c, h, w, seed=seed), randn(b, heads * k**4, h, w, seed=seed + 1)

    def reference(v, src):
        return outlook_ref(v, outlook_attn(src, heads, k, p, s), k, p, s).numpy()

    return Outlook(heads, k, p, s), make_inputs, reference, (True, True)


# (C, groups, k, stride, padding, dilation)
INVOLUTION = [
    pytest.param(4, 2, 3, 1, 1, 1, id="k3-s1-p1"),
    pytest.param(4, 1, 3, 2, 1, 1, id="k3-s2-p1"),
    pytest.param(2, 2, 5, 3, 2, 1, id="k5-s3-p2"),
    pytest.param(2, 1, 3, 2, 0, 2, id="k3-s2-p0-d2"),
    pytest.param(2, 1, 7, 1, 3, 1, id="k7-s1-p3"),
]
# (Cin, Cout, kh, kw, stride, padding, dilation, groups)
DYNAMIC_CONV = [
    pytest.param(4, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1, id="k3-s1-p1"),
    pytest.param(4, 4, 3, 3, (2, 2), (1, 1), (1, 1), 4, id="depthwise-k3-s2"),
    pytest.param(3, 6, 3, 2, (3, 2), (0, 1), (1, 2), 3, id="k3x2-s3x2-p0x1-d1x2"),
]
# (C, heads, k, padding, stride)
OUTLOOK = [
    pytest.param(4, 2, 3, 1, 1, id="k3-p1-s1"),
    pytest.param(4, 2, 3, 1, 2, id="k3-p1-s2"),
    pytest.param(2, 1, 3, 0, 3, id="k3-p0-s3"),
    pytest.param(2, 1, 2, 1, 2, id="k2-p1-s2"),
    pytest.param(2, 1, 3, 4, 1, id="k3-p4-s1"),
]

#: Cases of the optimized, traced-twice test below (it runs them at every size too); the others here.
BAKED = {"involution": ("k5-s3-p2",), "dynamic_conv": ("k3x2-s3x2-p0x1-d1x2",), "outlook": ("k3-p1-s1", "k3-p1-s2")}
CASES = [
    pytest.param(op, c.values, id=f"{op}-{c.id}")
    for op, cases in (("involution", INVOLUTION), ("dynamic_conv", DYNAMIC_CONV), ("outlook", OUTLOOK))
    for c in cases
    if c.id not in BAKED[op]
]
MAKERS = {"involution": involution_case, "dynamic_conv": dynamic_conv_case, "outlook": outlook_case}


@pytest.mark.parametrize(("op", "values"), CASES)
def test_ort_lowering_with_symbolic_height_and_width(op, values):
    """One export with symbolic B, H, W; onnxruntime at odd, non-square, non-multiple-of-stride sizes."""
    module, make_inputs, reference, spatial = MAKERS[op](*values)
    model = export(module, floats(make_inputs(*TRACED, seed=0)), onnx_translation_table("ort"), spatial)
    check_symbolic(model)
    run_sizes(ort_runner(model), make_inputs, reference)


@pytest.mark.parametrize(
    ("op", "values"),
    [
        pytest.param(op, c.values, id=f"{op}-{c.id}")
        for op, cases in (("involution", INVOLUTION), ("dynamic_conv", DYNAMIC_CONV), ("outlook", OUTLOOK))
        for c in cases
        if c.id in BAKED[op]
    ],
)
def test_no_size_is_baked_into_the_graph(op, values):
    """Traced at 9x8 and at 14x11 (optimized, as the pipeline exports): the same nodes, attributes and
    constants, so every size in the graph is computed from the input's shape. The optimized graph runs
    at the other sizes too."""
    module, make_inputs, reference, spatial = MAKERS[op](*values)
    model = check_same_graph_at_another_trace(module, make_inputs, onnx_translation_table("ort"), spatial)
    ops = {n.op_type for n in all_nodes(model.graph)}
    assert "Col2Im" not in ops and "Loop" not in ops
    if op != "dynamic_conv":  # the Scan's Conv takes each sample's size: nothing to compute
        assert "Shape" in ops
    run_sizes(ort_runner(model), make_inputs, reference)


@pytest.mark.parametrize(
    ("op", "values"),
    [
        pytest.param("involution", INVOLUTION[1].values, id="involution-k3-s2-p1"),
        pytest.param("dynamic_conv", DYNAMIC_CONV[2].values, id="dconv-s3x2"),
        pytest.param("outlook", OUTLOOK[1].values, id="outlook-k3-p1-s2"),
    ],
)
def test_plugin_graph_with_symbolic_height_and_width(op, values):
    """Target ``trt``: one plugin node per op call, its output symbolic in H and W; the graph runs on
    ``onnx.reference`` with the numpy plugin references at several sizes."""
    module, make_inputs, reference, spatial = MAKERS[op](*values)
    model = export(module, floats(make_inputs(*TRACED, seed=0)), onnx_translation_table("trt"), spatial)
    check_symbolic(model)
    plugins = [n for n in model.graph.node if n.op_type.startswith("AttnExport")]
    assert len(plugins) == 1
    run_sizes(reference_runner(model), make_inputs, reference)


@pytest.mark.parametrize("values", [c.values for c in OUTLOOK], ids=[c.id for c in OUTLOOK])
def test_outlook_direct_form_float64_with_symbolic_height_and_width(values):
    """The outlook direct form (unfold Conv, transposed MatMul, ConvTranspose fold, and its Pad/Slice
    for a computed size) at every stride, exported once in float64 with symbolic B, H, W, matches the
    float64 reference to 1e-10 at odd, non-square sizes. onnxruntime's Conv is float32 only, so
    ``onnx.reference`` runs it (its grouped ConvTranspose replaced, see onnx_helpers)."""

    def lowering(v, attn, kernel_size=3, padding=1, stride=1):
        return outlook_lowering.unfold_matmul_fold(v, attn, kernel_size, padding, stride)

    module, make_inputs, reference, spatial = outlook_case(*values)
    table = {**onnx_translation_table("ort"), torch.ops.attn_export.outlook_aggregate.default: lowering}
    model = export(module, make_inputs(*TRACED, seed=0), table, spatial)
    check_symbolic(model)
    ev = ReferenceEvaluator(model, new_ops=[ConvTranspose])
    names = list(ev.input_names)

    def run(inputs):
        (got,) = ev.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})
        assert got.dtype == np.float64
        return got

    run_sizes(run, make_inputs, reference, atol=1e-10)


# ------------------------------------------------------------------------------------------ F.fold / F.unfold
class FoldUnfold(nn.Module):
    """The official VOLO/outlook habit: ``F.unfold``, a per-window mix, ``F.fold`` to the input's size."""

    def __init__(self, k: int, p: int, s: int) -> None:
        super().__init__()
        self.geometry = (k, p, s)

    def forward(self, x):
        k, p, s = self.geometry
        height, width = x.shape[2], x.shape[3]
        cols = F.unfold(x, k, padding=p, stride=s)  # B, C*k*k, L
        cols = cols * torch.sigmoid(cols.mean(1, keepdim=True))
        return F.fold(cols, output_size=(height, width), kernel_size=k, padding=p, stride=s)


def test_fold_unfold_rewrites_with_symbolic_height_and_width():
    """The adapt step's ``F.fold``/``F.unfold`` rewrites (strided slices, no Col2Im) exported once with a
    symbolic H and W, against eager ``F.fold(F.unfold(...))`` in float64. (One geometry, stride 2 on odd
    and even sizes: the rewritten fold's in-place slice adds export as ScatterND chains whose index
    arithmetic makes this export slow; the slices themselves are the ops' tap geometry, swept above.)"""
    k, p, s = 3, 1, 2
    from attn_export.export.adapt import function_rewrites

    module = FoldUnfold(k, p, s)
    with function_rewrites():
        model = export(module, (randn(*TRACED[:1], 3, *TRACED[1:], seed=0).float(),), {})
    check_symbolic(model)
    assert not {"Col2Im", "Im2Col"} & {n.op_type for n in all_nodes(model.graph)}

    def make_inputs(b, h, w, seed):
        return (randn(b, 3, h, w, seed=seed),)

    run_sizes(ort_runner(model), make_inputs, lambda x: module(x).numpy())


class BatchFoldedConv(nn.Module):
    """The official ODConv/CondConv habit: the batch folded into the channels, ``groups = g * B``."""

    def __init__(self, cin: int, cout: int, g: int, s: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // g, 3, 3, dtype=torch.float64) * 0.3)
        self.g, self.s, self.cin = g, s, cin

    def forward(self, x):
        b = x.shape[0]
        scale = torch.sigmoid(x.mean((2, 3)))[:, :1, None, None, None]  # one per sample
        w = (self.weight[None] * scale).reshape(-1, self.cin // self.g, 3, 3)  # B*Cout, Cin/g, 3, 3
        y = F.conv2d(x.reshape(1, -1, x.shape[2], x.shape[3]), w, None, self.s, 1, 1, self.g * b)
        return y.reshape(b, -1, y.shape[2], y.shape[3])


def test_batch_folded_conv_rewrite_with_symbolic_height_and_width():
    from attn_export.export.adapt import function_rewrites

    module = BatchFoldedConv(4, 6, 2, 2)
    with function_rewrites():
        model = export(module.float(), (randn(*TRACED[:1], 4, *TRACED[1:], seed=0).float(),), onnx_translation_table())
    check_symbolic(model)
    module.double()

    def make_inputs(b, h, w, seed):
        return (randn(b, 4, h, w, seed=seed),)

    run_sizes(ort_runner(model), make_inputs, lambda x: module(x).detach().numpy())


# ------------------------------------------------------------------------------------------ the blocks
def _blocks():
    from attn_export.blocks.gsop import GSoPBlock
    from attn_export.blocks.involution import Involution2d
    from attn_export.blocks.odconv import ODConv2d
    from attn_export.blocks.outlook import OutlookAttention
    from attn_export.blocks.skconv import SKConv

    return {
        "involution-s2": lambda: Involution2d(8, kernel_size=3, stride=2, reduction=2, group_channels=4),
        "odconv-s2": lambda: ODConv2d(8, 8, 3, stride=2, padding=1, kernel_num=2, min_channel=4),
        "outlook-s2": lambda: OutlookAttention(8, 2, kernel_size=3, padding=1, stride=2),
        "gsop": lambda: GSoPBlock(8, mid_channels=4),
        "skconv-s2": lambda: SKConv(8, groups=2, reduction=2, min_dim=4, stride=2),
    }


@pytest.mark.parametrize("name", ["involution-s2", "odconv-s2", "outlook-s2", "gsop", "skconv-s2"])
def test_blocks_with_symbolic_height_and_width(name):
    """Each block (eval mode, random weights and BatchNorm statistics) exported once through the export
    pipeline's ``torch_onnx_export(..., dynamic_hw=True)``, on onnxruntime at odd and non-square sizes
    against the block itself in float64."""
    from attn_export.export.torch_export import torch_onnx_export

    torch.manual_seed(0)
    block = _blocks()[name]().eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    channels_last = name.startswith("outlook")

    def make_inputs(b, h, w, seed):
        return (randn(b, h, w, 8, seed=seed) if channels_last else randn(b, 8, h, w, seed=seed),)

    if channels_last:  # the pipeline's dynamic_hw is for (B, C, H, W) images: name the axes here
        model = export(block, floats(make_inputs(*TRACED, seed=0)), onnx_translation_table(), ((1, 2),))
    else:
        model = torch_onnx_export(block, floats(make_inputs(*TRACED, seed=0)), onnx_translation_table(), 18, True)
        assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == [
            "batch",
            "",
            "height",
            "width",
        ]
    check_symbolic(model, (1, 2) if channels_last else None)
    block.double()
    with torch.no_grad():
        run_sizes(ort_runner(model), make_inputs, lambda x: block(x).numpy())
