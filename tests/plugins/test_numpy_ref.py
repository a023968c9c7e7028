"""The numpy references of the plugin nodes (target ``trt``) against the torch ops, and their ``OpRun`` nodes.

The numpy code (``plugins/<op>/numpy_ref.py``) is what verifies a ``--target trt`` graph on machines
without TensorRT, so it is held to the torch ops (themselves tested against naive loops in
``test_ops.py``) in float64 over strides, padding, dilation, groups and heads, odd sizes; float16 in
gives float16 out, accumulated in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from onnx.reference import ReferenceEvaluator

from attn_export.plugins import dynamic_conv2d, involution2d, outlook_aggregate, reference_ops
from attn_export.plugins._trt_names import DOMAIN, DYNAMIC_CONV, INVOLUTION, NAMESPACE, OUTLOOK, PLUGINS, VERSION
from attn_export.plugins.dynamic_conv import numpy_ref as dyn_np
from attn_export.plugins.involution import numpy_ref as inv_np
from attn_export.plugins.outlook import numpy_ref as outl_np


def rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def conv_len(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def torch_op(fn, *arrays, **kwargs) -> np.ndarray:
    """The torch op on float64 copies of the arrays."""
    with torch.no_grad():
        return fn(*(torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays), **kwargs).numpy()


# --- involution ------------------------------------------------------------------------------------------
# B, C, H, W, groups, k, stride, padding, dilation
INVOLUTION_CASES = [
    pytest.param(1, 16, 9, 9, 1, 7, 1, 3, 1, id="c16-9x9-g1-k7-p3"),
    pytest.param(3, 8, 7, 5, 2, 3, 2, 1, 1, id="b3-7x5-g2-k3-s2"),
    pytest.param(2, 12, 9, 8, 3, 3, 1, 2, 2, id="g3-k3-p2-d2"),
    pytest.param(5, 4, 6, 7, 4, 5, 2, 2, 1, id="b5-g4-k5-s2"),
    pytest.param(4, 6, 5, 5, 6, 1, 1, 0, 1, id="g6-k1"),
    pytest.param(1, 2, 7, 9, 2, 3, 3, 0, 3, id="k3-s3-d3-p0"),
]


@pytest.mark.parametrize(("b", "c", "h", "w", "g", "k", "s", "p", "d"), INVOLUTION_CASES)
def test_involution_matches_torch(b, c, h, w, g, k, s, p, d):
    ho, wo = conv_len(h, k, s, p, d), conv_len(w, k, s, p, d)
    x, weight = rand(b, c, h, w, seed=1), rand(b, g, k * k, ho, wo, seed=2)
    out = inv_np.involution2d(x, weight, k, s, p, d)
    assert out.dtype == np.float64 and out.shape == (b, c, ho, wo)
    np.testing.assert_allclose(
        out, torch_op(involution2d, x, weight, kernel_size=k, stride=s, padding=p, dilation=d), rtol=1e-12, atol=1e-12
    )


# --- dynamic conv ----------------------------------------------------------------------------------------
# B, Cin, Cout, H, W, kh, kw, stride, padding, dilation, groups
DYNAMIC_CONV_CASES = [
    pytest.param(1, 4, 6, 7, 7, 3, 3, (1, 1), (1, 1), (1, 1), 1, id="4to6-k3-p1"),
    pytest.param(3, 8, 8, 9, 7, 3, 3, (2, 2), (1, 1), (1, 1), 8, id="depthwise-s2"),
    pytest.param(2, 6, 9, 8, 9, 5, 5, (1, 1), (2, 2), (1, 1), 3, id="g3-k5"),
    pytest.param(5, 4, 2, 5, 6, 1, 1, (1, 1), (0, 0), (1, 1), 1, id="k1"),
    pytest.param(4, 4, 4, 9, 9, 3, 3, (1, 1), (2, 2), (2, 2), 2, id="g2-d2-p2"),
    pytest.param(2, 3, 5, 7, 8, 2, 3, (2, 1), (0, 1), (1, 2), 1, id="k2x3-s2x1-p0x1-d1x2"),
]


@pytest.mark.parametrize(("b", "cin", "cout", "h", "w", "kh", "kw", "s", "p", "d", "g"), DYNAMIC_CONV_CASES)
def test_dynamic_conv_matches_torch(b, cin, cout, h, w, kh, kw, s, p, d, g):
    x, weight = rand(b, cin, h, w, seed=3), rand(b, cout, cin // g, kh, kw, seed=4)
    out = dyn_np.dynamic_conv2d(x, weight, s, p, d, g)
    ref = torch_op(dynamic_conv2d, x, weight, stride=list(s), padding=list(p), dilation=list(d), groups=g)
    assert out.dtype == np.float64 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


# --- outlook ---------------------------------------------------------------------------------------------
# B, C, H, W, heads, k, padding, stride
OUTLOOK_CASES = [
    pytest.param(1, 4, 5, 5, 1, 3, 1, 1, id="h1-k3-p1"),
    pytest.param(3, 8, 7, 5, 2, 3, 1, 2, id="b3-7x5-h2-s2"),
    pytest.param(2, 6, 6, 6, 3, 3, 1, 2, id="h3-s2"),
    pytest.param(5, 4, 5, 4, 2, 1, 0, 1, id="k1"),
    pytest.param(2, 4, 5, 5, 4, 5, 2, 2, id="h4-k5-p2-s2"),
    pytest.param(1, 2, 7, 7, 1, 2, 0, 2, id="k2-s2-gap"),
    pytest.param(4, 6, 6, 9, 3, 3, 0, 3, id="s3-nonoverlap"),
    pytest.param(2, 8, 3, 3, 2, 7, 3, 1, id="k7-p3-tiny"),
]


@pytest.mark.parametrize(("b", "c", "hh", "ww", "heads", "k", "p", "s"), OUTLOOK_CASES)
def test_outlook_matches_torch(b, c, hh, ww, heads, k, p, s):
    h, w = conv_len(hh, k, s, p, 1), conv_len(ww, k, s, p, 1)
    v, attn = rand(b, c, hh, ww, seed=5), rand(b, heads, h * w, k * k, k * k, seed=6)
    out = outl_np.outlook_aggregate(v, attn, k, p, s)
    assert out.dtype == np.float64 and out.shape == v.shape
    ref = torch_op(outlook_aggregate, v, attn, kernel_size=k, padding=p, stride=s)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


# --- dtypes ----------------------------------------------------------------------------------------------
def _case(op: str, dtype) -> tuple:
    """(numpy fn, torch fn, inputs, kwargs) of a small odd-sized case."""
    if op == "involution2d":
        x, w = rand(2, 8, 7, 6, seed=7), rand(2, 2, 9, 4, 3, seed=8)
        kw = {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1}
        return inv_np.involution2d, involution2d, (x.astype(dtype), w.astype(dtype)), kw
    if op == "dynamic_conv2d":
        x, w = rand(2, 8, 7, 6, seed=7), rand(2, 4, 4, 3, 3, seed=8)
        kw = {"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 2}
        return dyn_np.dynamic_conv2d, dynamic_conv2d, (x.astype(dtype), w.astype(dtype)), kw
    v, a = rand(2, 8, 7, 6, seed=7), rand(2, 2, 12, 9, 9, seed=8)
    kw = {"kernel_size": 3, "padding": 1, "stride": 2}
    return outl_np.outlook_aggregate, outlook_aggregate, (v.astype(dtype), a.astype(dtype)), kw


@pytest.mark.parametrize("op", list(PLUGINS))
@pytest.mark.parametrize(("dtype", "tol"), [(np.float32, 1e-5), (np.float16, 1e-2)], ids=["fp32", "fp16"])
def test_low_precision_keeps_the_dtype(op, dtype, tol):
    np_fn, torch_fn, inputs, kwargs = _case(op, dtype)
    out = np_fn(*inputs, **kwargs)
    assert out.dtype == dtype
    ref = torch_op(torch_fn, *inputs, **kwargs)  # float64 on the same (rounded) inputs
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol)


def test_fp16_accumulates_in_fp32():
    """A long sum of fp16 products: float16 accumulation would be off by far more than one fp16 rounding."""
    x = np.full((1, 1, 1, 400), 0.1, dtype=np.float16)
    w = np.full((1, 1, 1, 1, 400), 0.1, dtype=np.float16)  # 1x400 kernel over a 1x400 row: one dot product
    out = dyn_np.dynamic_conv2d(x, w, (1, 1), (0, 0), (1, 1), 1)
    exact = 400 * float(np.float16(0.1)) ** 2
    assert out.dtype == np.float16
    assert abs(float(out[0, 0, 0, 0]) - exact) <= 2e-3 * exact


def test_mixed_or_integer_dtypes_are_refused():
    with pytest.raises(TypeError, match="one dtype"):
        inv_np.involution2d(np.zeros((1, 2, 3, 3), np.float32), np.zeros((1, 1, 1, 3, 3), np.float16), 1)
    with pytest.raises(TypeError, match="floating"):
        inv_np.involution2d(np.zeros((1, 2, 3, 3), np.int64), np.zeros((1, 1, 1, 3, 3), np.int64), 1)


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (inv_np.involution2d, (np.zeros((1, 4, 5, 5)), np.zeros((1, 2, 9, 4, 4)), 3, 1, 1, 1)),  # Ho=5, not 4
        (dyn_np.dynamic_conv2d, (np.zeros((1, 4, 5, 5)), np.zeros((1, 6, 3, 3, 3)), (1, 1), (1, 1), (1, 1), 2)),
        (outl_np.outlook_aggregate, (np.zeros((1, 4, 5, 5)), np.zeros((1, 3, 25, 9, 9)), 3, 1, 1)),  # 3 heads
    ],
    ids=list(PLUGINS),
)
def test_shape_mismatches_are_refused(fn, args):
    with pytest.raises(ValueError, match="does not fit"):
        fn(*args)


# --- the OpRun nodes -------------------------------------------------------------------------------------
def test_reference_ops_are_the_plugins():
    ops = reference_ops()
    assert sorted(cls.__name__ for cls in ops) == sorted(PLUGINS.values())
    assert all(cls.op_domain == DOMAIN for cls in ops)
    for name in PLUGINS.values():
        assert not onnx.defs.has(name), f"{name} collides with a standard ONNX op"
        assert not onnx.defs.has(name, DOMAIN)


def single_node_model(name: str, x: np.ndarray, w: np.ndarray, out_shape, **attrs) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    node = helper.make_node(name, ["x", "w"], ["y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", elem, x.shape), helper.make_tensor_value_info("w", elem, w.shape)],
        [helper.make_tensor_value_info("y", elem, out_shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_plugin_nodes_run_in_the_reference_evaluator(dtype):
    plugin = {"plugin_namespace": NAMESPACE, "plugin_version": VERSION}
    x, w = rand(2, 6, 9, 7, seed=9).astype(dtype), rand(2, 3, 9, 5, 4, seed=10).astype(dtype)
    cases = [
        (
            INVOLUTION,
            inv_np.involution2d(x, w, 3, 2, 2, 2),
            x,
            w,
            {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2},
        ),
    ]
    wd = rand(2, 6, 2, 3, 2, seed=11).astype(dtype)
    dyn_attrs = {"stride": [2, 1], "padding": [1, 0], "dilation": [1, 2], "groups": 3}
    cases.append((DYNAMIC_CONV, dyn_np.dynamic_conv2d(x, wd, [2, 1], [1, 0], [1, 2], 3), x, wd, dyn_attrs))
    a = rand(2, 3, 20, 9, 9, seed=12).astype(dtype)
    cases.append(
        (OUTLOOK, outl_np.outlook_aggregate(x, a, 3, 1, 2), x, a, {"kernel_size": 3, "padding": 1, "stride": 2})
    )
    for name, expected, xi, wi, attrs in cases:
        model = single_node_model(name, xi, wi, expected.shape, **plugin, **attrs)
        (got,) = ReferenceEvaluator(model, new_ops=reference_ops()).run(None, {"x": xi, "w": wi})
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, expected)


def test_plugin_node_with_a_foreign_namespace_is_refused():
    x, w = rand(1, 2, 4, 4, seed=13).astype(np.float32), rand(1, 1, 1, 4, 4, seed=14).astype(np.float32)
    model = single_node_model(INVOLUTION, x, w, (1, 2, 4, 4), plugin_namespace="other", kernel_size=1)
    with pytest.raises(ValueError, match="plugin_namespace"):
        ReferenceEvaluator(model, new_ops=reference_ops()).run(None, {"x": x, "w": w})
