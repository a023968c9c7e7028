"""The ops' ONNX lowerings (target ``ort``) on onnxruntime against the ops' torch references.

Each case exports a tiny module that calls one op, with a dynamic batch, through the torch.onnx
(dynamo) exporter and the package's translation table, runs the graph on onnxruntime at batches 1, 3
and 5, and compares with the op's reference computed in float64 (max error < 1e-4 in float32). The
graphs must hold no ``Col2Im`` and nothing that depends on the batch the exporter traced with.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx_helpers import ConvTranspose, quiet_export, session
from torch import nn

from attn_export.plugins import onnx_translation_table
from attn_export.plugins._taps import out_size
from attn_export.plugins.dynamic_conv.op import reference as dynamic_conv_ref
from attn_export.plugins.involution.op import reference as involution_ref
from attn_export.plugins.outlook import onnx_lowering as outlook_lowering
from attn_export.plugins.outlook.op import reference as outlook_ref

BATCHES = (1, 3, 5)
ATOL = 1e-4


class Involution(nn.Module):
    def __init__(self, k: int, s: int, p: int, d: int) -> None:
        super().__init__()
        self.geometry = (k, s, p, d)

    def forward(self, x, weight):
        return torch.ops.attn_export.involution2d(x, weight, *self.geometry)


class DynamicConv(nn.Module):
    def __init__(self, s, p, d, g: int) -> None:
        super().__init__()
        self.geometry = (list(s), list(p), list(d), g)

    def forward(self, x, weight):
        return torch.ops.attn_export.dynamic_conv2d(x, weight, *self.geometry)


class Outlook(nn.Module):
    def __init__(self, k: int, p: int, s: int) -> None:
        super().__init__()
        self.geometry = (k, p, s)

    def forward(self, v, attn):
        return torch.ops.attn_export.outlook_aggregate(v, attn, *self.geometry)


def export(module: nn.Module, args: tuple, table: dict | None = None):
    """The ONNX model of ``module(*args)`` with a dynamic batch on every input."""
    batch = torch.export.Dim("batch", min=1)
    return quiet_export(module, args, tuple({0: batch} for _ in args), table or onnx_translation_table("ort"), True)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def all_nodes(graph):
    """Every node of ``graph``, including those of subgraphs (a Scan's body)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)


def check_graph(model, groups: int | None = None) -> None:
    """No Col2Im, no Loop; every Conv/ConvTranspose ``group`` is ``groups``, a count fixed by the op's
    arguments (None: no such node at all), never one that holds the batch; the batch is symbolic on
    every input and output."""
    nodes = list(all_nodes(model.graph))
    ops = {n.op_type for n in nodes}
    assert "Col2Im" not in ops
    assert "Loop" not in ops
    # height and width are static here: every size is a constant, nothing is computed from Shape at run
    # time (the symbolic-size path of plugins/_onnx.py stays out of static graphs)
    assert "Shape" not in ops
    for node in nodes:
        if node.op_type in ("Conv", "ConvTranspose"):
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            assert groups is not None and group == groups, f"{node.op_type} with group={group}"
    for value in [*model.graph.input, *model.graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value"), f"{value.name}: batch is not symbolic"


def run_cases(module: nn.Module, make_inputs, reference, groups: int | None = None, table: dict | None = None) -> None:
    """Export at batch 2, run at every batch in BATCHES, compare with the float64 reference."""
    model = export(module, tuple(t.float() for t in make_inputs(2, seed=0)), table)
    check_graph(model, groups)
    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    for b in BATCHES:
        inputs = make_inputs(b, seed=b)
        expected = reference(*inputs).numpy()
        (got,) = sess.run(None, {n: t.float().numpy() for n, t in zip(names, inputs, strict=True)})
        assert got.shape == expected.shape, (b, got.shape, expected.shape)
        err = float(np.abs(got.astype(np.float64) - expected).max())
        assert err < ATOL, f"batch {b}: max error {err:.2e}"


# --------------------------------------------------------------------------------------------------
# involution2d: (C, H, W, groups, k, stride, padding, dilation)
# --------------------------------------------------------------------------------------------------
INVOLUTION_CASES = [
    pytest.param(16, 9, 9, 1, 7, 1, 3, 1, id="c16-9x9-g1-k7-s1-p3"),
    pytest.param(8, 7, 5, 2, 3, 2, 1, 1, id="c8-7x5-g2-k3-s2-p1"),
    pytest.param(12, 9, 8, 3, 3, 1, 2, 2, id="c12-9x8-g3-k3-p2-d2"),
    pytest.param(4, 6, 7, 4, 5, 2, 2, 1, id="c4-6x7-g4-k5-s2-p2"),
    pytest.param(6, 5, 5, 6, 1, 1, 0, 1, id="c6-5x5-g6-k1"),
    pytest.param(4, 8, 8, 1, 3, 3, 0, 1, id="c4-8x8-k3-s3-p0"),
    pytest.param(2, 7, 9, 2, 3, 1, 0, 3, id="c2-7x9-g2-k3-d3-p0"),
    pytest.param(8, 5, 5, 2, 7, 2, 3, 1, id="c8-5x5-g2-k7-s2-p3"),
    pytest.param(4, 11, 9, 2, 4, 3, 2, 2, id="c4-11x9-g2-k4-s3-p2-d2"),
    pytest.param(4, 10, 9, 1, 3, 2, 5, 1, id="c4-10x9-k3-s2-p5"),
]


@pytest.mark.parametrize(("c", "h", "w", "g", "k", "s", "p", "d"), INVOLUTION_CASES)
def test_involution2d_lowering(c, h, w, g, k, s, p, d):
    ho, wo = out_size(h, k, s, p, d), out_size(w, k, s, p, d)

    def make_inputs(b, seed):
        return randn(b, c, h, w, seed=seed), randn(b, g, k * k, ho, wo, seed=seed + 100, scale=k**-1)

    run_cases(Involution(k, s, p, d), make_inputs, lambda x, wt: involution_ref(x, wt, k, s, p, d))


# --------------------------------------------------------------------------------------------------
# dynamic_conv2d: (Cin, Cout, H, W, kh, kw, stride, padding, dilation, groups)
# --------------------------------------------------------------------------------------------------
DYNAMIC_CONV_CASES = [
    pytest.param(4, 6, 7, 7, 3, 3, (1, 1), (1, 1), (1, 1), 1, id="4to6-7x7-k3-p1"),
    pytest.param(8, 8, 9, 7, 3, 3, (2, 2), (1, 1), (1, 1), 8, id="depthwise8-9x7-k3-s2"),
    pytest.param(6, 9, 8, 9, 5, 5, (1, 1), (2, 2), (1, 1), 3, id="6to9-g3-8x9-k5"),
    pytest.param(4, 2, 5, 6, 1, 1, (1, 1), (0, 0), (1, 1), 1, id="4to2-k1"),
    pytest.param(4, 4, 9, 9, 3, 3, (1, 1), (2, 2), (2, 2), 2, id="g2-k3-d2-p2"),
    pytest.param(3, 5, 7, 8, 2, 3, (2, 1), (0, 1), (1, 2), 1, id="k2x3-s2x1-p0x1-d1x2"),
    pytest.param(16, 32, 5, 5, 7, 7, (1, 1), (3, 3), (1, 1), 4, id="16to32-g4-k7"),
    pytest.param(4, 4, 6, 6, 1, 1, (2, 2), (0, 0), (1, 1), 1, id="4to4-k1-s2"),
]


@pytest.mark.parametrize(("cin", "cout", "h", "w", "kh", "kw", "s", "p", "d", "g"), DYNAMIC_CONV_CASES)
def test_dynamic_conv2d_lowering(cin, cout, h, w, kh, kw, s, p, d, g):
    def make_inputs(b, seed):
        fan_in = (cin // g) * kh * kw
        return randn(b, cin, h, w, seed=seed), randn(b, cout, cin // g, kh, kw, seed=seed + 100, scale=fan_in**-0.5)

    run_cases(
        DynamicConv(s, p, d, g),
        make_inputs,
        lambda x, wt: dynamic_conv_ref(x, wt, list(s), list(p), list(d), g),
        groups=g,
    )


@pytest.mark.parametrize(("cin", "cout", "h", "w", "kh", "kw", "s", "p", "d", "g"), DYNAMIC_CONV_CASES)
def test_dynamic_conv2d_lowering_float64(cin, cout, h, w, kh, kw, s, p, d, g):
    """float64 (no Conv on onnxruntime's CPU) takes the im2col + MatMul form; exact to 1e-10."""
    module = DynamicConv(s, p, d, g)
    x, wt = randn(2, cin, h, w, seed=1), randn(2, cout, cin // g, kh, kw, seed=2)
    model = export(module, (x, wt))
    check_graph(model, groups=g)
    sess = session(model)
    for b in BATCHES:
        x, wt = randn(b, cin, h, w, seed=b), randn(b, cout, cin // g, kh, kw, seed=b + 100)
        (got,) = sess.run(None, {"x": x.numpy(), "weight": wt.numpy()})
        np.testing.assert_allclose(got, dynamic_conv_ref(x, wt, list(s), list(p), list(d), g).numpy(), atol=1e-10)


# --------------------------------------------------------------------------------------------------
# outlook_aggregate: (C, H, W, heads, k, padding, stride)
# --------------------------------------------------------------------------------------------------
OUTLOOK_CASES = [
    pytest.param(8, 9, 7, 2, 3, 1, 1, id="c8-9x7-h2-k3-p1-s1"),
    pytest.param(8, 9, 7, 2, 3, 1, 2, id="c8-9x7-h2-k3-p1-s2"),
    pytest.param(6, 8, 8, 3, 3, 1, 2, id="c6-8x8-h3-k3-p1-s2"),
    pytest.param(4, 7, 9, 1, 5, 2, 1, id="c4-7x9-h1-k5-p2-s1"),
    pytest.param(4, 7, 9, 2, 5, 2, 3, id="c4-7x9-h2-k5-p2-s3"),
    pytest.param(4, 6, 5, 1, 3, 0, 1, id="c4-6x5-k3-p0-s1"),
    pytest.param(4, 6, 5, 1, 3, 0, 2, id="c4-6x5-k3-p0-s2"),
    pytest.param(4, 6, 6, 2, 3, 2, 1, id="c4-6x6-h2-k3-p2"),
    pytest.param(4, 5, 5, 1, 1, 0, 1, id="c4-5x5-k1"),
    pytest.param(4, 7, 8, 2, 2, 1, 2, id="c4-7x8-h2-k2-p1-s2"),
    pytest.param(4, 10, 9, 1, 3, 4, 1, id="c4-10x9-k3-p4"),
    pytest.param(4, 10, 9, 1, 3, 5, 2, id="c4-10x9-k3-p5-s2"),
]


@pytest.mark.parametrize(("c", "h", "w", "heads", "k", "p", "s"), OUTLOOK_CASES)
def test_outlook_aggregate_lowering(c, h, w, heads, k, p, s):
    gh, gw = out_size(h, k, s, p, 1), out_size(w, k, s, p, 1)

    def make_inputs(b, seed):
        attn = randn(b, heads, gh * gw, k * k, k * k, seed=seed + 100).softmax(-1)
        return randn(b, c, h, w, seed=seed), attn

    # stride > 1: the fold is a ConvTranspose with one group per channel (never per sample)
    run_cases(Outlook(k, p, s), make_inputs, lambda v, a: outlook_ref(v, a, k, p, s), groups=c)


@pytest.mark.parametrize(
    ("c", "h", "w", "heads", "k", "p", "s"), [case for case in OUTLOOK_CASES if case.values[-1] > 1]
)
def test_outlook_per_pixel_kernel_form_at_any_stride(c, h, w, heads, k, p, s):
    """The per-pixel kernel form is exact at strides > 1 too (the lowering uses it for stride 1)."""
    gh, gw = out_size(h, k, s, p, 1), out_size(w, k, s, p, 1)

    def make_inputs(b, seed):
        attn = randn(b, heads, gh * gw, k * k, k * k, seed=seed + 100).softmax(-1)
        return randn(b, c, h, w, seed=seed), attn

    def lowering(v, attn, kernel_size=3, padding=1, stride=1):
        return outlook_lowering.per_pixel_kernel(v, attn, kernel_size, padding, stride)

    table = {**onnx_translation_table("ort"), torch.ops.attn_export.outlook_aggregate.default: lowering}
    run_cases(Outlook(k, p, s), make_inputs, lambda v, a: outlook_ref(v, a, k, p, s), table=table)


class VoloOutlook(nn.Module):
    """attn arrives as VOLO computes it: (B, h*w, heads, k*k, k*k), softmaxed, then permuted to
    (B, heads, h*w, ...); the direct form's Transpose of attn cancels against that permute."""

    def __init__(self, k: int, p: int, s: int) -> None:
        super().__init__()
        self.geometry = (k, p, s)

    def forward(self, v, logits):
        attn = (logits * 0.5).softmax(-1).permute(0, 2, 1, 3, 4)
        return torch.ops.attn_export.outlook_aggregate(v, attn, *self.geometry)


def direct_form_table() -> dict:
    def lowering(v, attn, kernel_size=3, padding=1, stride=1):
        return outlook_lowering.unfold_matmul_fold(v, attn, kernel_size, padding, stride)

    return {**onnx_translation_table("ort"), torch.ops.attn_export.outlook_aggregate.default: lowering}


@pytest.mark.parametrize(
    ("c", "h", "w", "heads", "k", "p", "s"),
    [
        pytest.param(6, 9, 7, 3, 3, 1, 1, id="c6-9x7-h3-k3-p1-s1"),
        pytest.param(6, 9, 7, 3, 3, 1, 2, id="c6-9x7-h3-k3-p1-s2"),
        pytest.param(4, 11, 13, 2, 3, 1, 3, id="c4-11x13-h2-k3-p1-s3"),
        pytest.param(4, 7, 9, 2, 5, 2, 3, id="c4-7x9-h2-k5-p2-s3"),
        pytest.param(4, 10, 9, 1, 2, 0, 2, id="c4-10x9-k2-p0-s2"),
    ],
)
def test_outlook_direct_form_float64(c, h, w, heads, k, p, s):
    """The direct form (unfold Conv, transposed batched MatMul, ConvTranspose fold) in float64 matches the
    float64 reference to 1e-10 at strides 1 to 3 and odd sizes, with attn as an input and as VOLO makes it.
    Its Transposes are plain batched 2-D ones, and one of attn: none reverses the innermost axes.
    onnxruntime's CPU Conv is float32 only, so the float64 graph runs on ``onnx.reference`` (the float32
    graph runs on onnxruntime in the tests above)"""
    gh, gw = out_size(h, k, s, p, 1), out_size(w, k, s, p, 1)
    for module, attn_of in (
        (Outlook(k, p, s), lambda a: a.softmax(-1)),
        (VoloOutlook(k, p, s), lambda a: (a * 0.5).softmax(-1).permute(0, 2, 1, 3, 4)),
    ):
        shape = (2, heads, gh * gw, k * k, k * k) if isinstance(module, Outlook) else (2, gh * gw, heads, k * k, k * k)
        logits = randn(*shape, seed=7)
        v = randn(2, c, h, w, seed=8)
        attn_in = attn_of(logits) if isinstance(module, Outlook) else logits
        model = export(module, (v, attn_in), direct_form_table())
        perms = {tuple(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute}
        assert perms <= {(0, 2, 1), (0, 2, 1, 4, 3), (0, 1, 2, 4, 3)}, perms  # after VOLO's permute: the latter
        evaluator = ReferenceEvaluator(model, new_ops=[ConvTranspose])
        for b in (1, 3):
            logits, v = randn(b, *shape[1:], seed=10 + b), randn(b, c, h, w, seed=20 + b)
            attn_in = attn_of(logits) if isinstance(module, Outlook) else logits
            feeds = {n: t.numpy() for n, t in zip(evaluator.input_names, (v, attn_in), strict=True)}
            (got,) = evaluator.run(None, feeds)
            assert got.dtype == np.float64
            want = outlook_ref(v, attn_of(logits), k, p, s).numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# other dtypes: the lowerings take their constants' dtype from the inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["involution2d", "dynamic_conv2d", "outlook_aggregate"])
def test_lowerings_export_in_float64(op):
    """A float64 export runs in float64 on onnxruntime and matches the reference to 1e-10."""
    if op == "involution2d":
        module = Involution(3, 2, 1, 1)
        inputs = (randn(3, 4, 7, 6, seed=1), randn(3, 2, 9, 4, 3, seed=2))
        reference = lambda x, w: involution_ref(x, w, 3, 2, 1, 1)  # noqa: E731
    elif op == "dynamic_conv2d":
        module = DynamicConv((1, 1), (1, 1), (1, 1), 2)
        inputs = (randn(3, 4, 6, 5, seed=1), randn(3, 6, 2, 3, 3, seed=2))
        reference = lambda x, w: dynamic_conv_ref(x, w, [1, 1], [1, 1], [1, 1], 2)  # noqa: E731
    else:
        module = Outlook(3, 1, 1)
        inputs = (randn(3, 4, 6, 5, seed=1), randn(3, 2, 30, 9, 9, seed=2).softmax(-1))
        reference = lambda v, a: outlook_ref(v, a, 3, 1, 1)  # noqa: E731
    model = export(module, inputs)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    sess = session(model)
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    (got,) = sess.run(None, feeds)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, reference(*inputs).numpy(), rtol=0, atol=1e-10)


def test_graph_does_not_depend_on_the_traced_batch():
    """Exports traced at batch 2 and at batch 3 are the same graph (op types and attributes)."""

    plain = (onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING)

    def signature(model):
        return [
            (n.op_type, sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute if a.type in plain))
            for n in all_nodes(model.graph)
        ]

    cases = [
        (Involution(3, 2, 1, 1), lambda b: (randn(b, 4, 7, 6, seed=1), randn(b, 2, 9, 4, 3, seed=2))),
        (DynamicConv((1, 1), (1, 1), (1, 1), 2), lambda b: (randn(b, 4, 6, 5, seed=1), randn(b, 6, 2, 3, 3, seed=2))),
        (Outlook(3, 1, 2), lambda b: (randn(b, 4, 6, 5, seed=1), randn(b, 2, 9, 9, 9, seed=2))),
    ]
    for module, make in cases:
        a = export(module, tuple(t.float() for t in make(2)))
        b = export(module, tuple(t.float() for t in make(3)))
        assert signature(a) == signature(b), type(module).__name__
