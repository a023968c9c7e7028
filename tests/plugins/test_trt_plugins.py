"""The TensorRT plugins of the three ops (``attn_export.plugins.<op>.trt_plugin``, ``attn_export.plugins.trt``).

What runs everywhere:

- the output shapes the registered functions compute from shape expressions, against the ops' fake
  kernels over strides, paddings, dilations and odd sizes;
- the launch plan (grid, int32 scalars, block sizes) shared by the JIT and AOT paths, against what the
  ops' Triton launchers pass, and symbolic against concrete;
- the AOT entries (TensorRT's parameter order) and the JIT ``launch`` against the ops' references, run
  in Triton's interpreter on CPU (compiled on a GPU when there is one);
- the AOT kernels compiled for a CUDA target (no GPU needed to compile) with exactly the parameters
  TensorRT passes;
- import hygiene and the error where TensorRT is absent.

``@pytest.mark.trt`` tests register the real plugins and run engines (skipped without TensorRT and a GPU).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attn_export.plugins  # noqa: F401  (registers the torch ops)
from attn_export.plugins import _shape_expr as shape_expr
from attn_export.plugins import _trt_kit
from attn_export.plugins import trt as trt_plugins
from attn_export.plugins._plugin_node import attribute_order
from attn_export.plugins._taps import out_size
from attn_export.plugins._trt_names import NAMESPACE, PLUGINS
from attn_export.plugins.dynamic_conv import op as dconv_op
from attn_export.plugins.dynamic_conv import plan as dconv_plan
from attn_export.plugins.dynamic_conv import trt_plugin as dconv_trt
from attn_export.plugins.involution import op as inv_op
from attn_export.plugins.involution import plan as inv_plan
from attn_export.plugins.involution import trt_plugin as inv_trt
from attn_export.plugins.outlook import op as outlook_op
from attn_export.plugins.outlook import plan as outlook_plan
from attn_export.plugins.outlook import trt_plugin as outlook_trt

OPS = torch.ops.attn_export


# ------------------------------------------------------------------------------------------ the test double
class Sym:
    """Test double of ``tensorrt.plugin.ShapeExpr``.

    A double is used here, and only here, because the real ``ShapeExpr`` cannot be loaded without
    TensorRT's libraries (``tensorrt.plugin`` imports ``tensorrt``, whose PyPI wheels here are stubs).
    It mirrors exactly what ``ShapeExpr`` supports (read in the TensorRT 11.4 bindings, ``_tensor.py``):
    ``+``, ``-``, ``*``, ``//`` with an int or another expression on the right. It has no reflected
    operators (``2 * expr`` fails, as it does on the real one) and no truth value (the real one has none
    while TensorRT derives output types), so code that only passes with ints fails here.
    """

    def __init__(self, value: int) -> None:
        self.value = int(value)

    @staticmethod
    def _v(other) -> int:
        if isinstance(other, Sym):
            return other.value
        if isinstance(other, int) and not isinstance(other, bool):
            return other
        raise TypeError(f"ShapeExpr takes an int or a ShapeExpr, got {type(other).__name__}")

    def __add__(self, other):
        return Sym(self.value + self._v(other))

    def __sub__(self, other):
        return Sym(self.value - self._v(other))

    def __mul__(self, other):
        return Sym(self.value * self._v(other))

    def __floordiv__(self, other):
        return Sym(self.value // self._v(other))

    def __bool__(self):
        raise TypeError("a ShapeExpr has no truth value while TensorRT builds the network")

    def __index__(self):
        raise TypeError("a ShapeExpr is not an int")

    def __repr__(self) -> str:
        return f"Sym({self.value})"


def sym_shape(shape) -> tuple[Sym, ...]:
    return tuple(Sym(d) for d in shape)


def evaluate(values):
    return tuple(v.value if isinstance(v, Sym) else v for v in values)


def fake_shape(op, *shapes, args):
    """The op's output shape from its fake kernel (meta tensors)."""
    tensors = [torch.empty(s, device="meta") for s in shapes]
    return tuple(op(*tensors, *args).shape)


# ------------------------------------------------------------------------------------------ geometries
# (B, C, G, H, W, k, stride, padding, dilation)
INVOLUTION_CASES = [
    (1, 8, 2, 7, 9, 3, 1, 1, 1),
    (3, 8, 2, 7, 9, 3, 2, 1, 1),
    (2, 4, 1, 7, 9, 1, 1, 0, 1),
    (1, 8, 2, 9, 7, 5, 1, 2, 1),
    (3, 6, 3, 8, 9, 3, 1, 2, 2),
    (1, 8, 4, 11, 10, 7, 2, 3, 1),
    (2, 3, 1, 7, 9, 3, 2, 0, 1),
    (1, 16, 1, 13, 5, 3, 3, 0, 2),
]

# (B, Cin, Cout, H, W, (kh, kw), stride, padding, dilation, groups)
DCONV_CASES = [
    (2, 4, 6, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 6, 4, 9, 8, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (3, 8, 8, 7, 7, (1, 1), (1, 1), (0, 0), (1, 1), 4),
    (1, 4, 2, 11, 6, (5, 3), (2, 3), (2, 1), (1, 1), 1),
    (2, 3, 6, 10, 13, (3, 3), (1, 2), (0, 2), (2, 1), 3),
]

# (B, C, heads, H, W, k, padding, stride)
OUTLOOK_CASES = [
    (1, 8, 2, 7, 7, 3, 1, 1),
    (2, 8, 2, 7, 6, 3, 1, 2),
    (1, 6, 3, 9, 5, 3, 0, 1),
    (2, 4, 1, 8, 8, 5, 2, 2),
    (1, 4, 2, 6, 9, 1, 0, 1),
]


def involution_shapes(case):
    b, c, g, h, w, k, s, p, d = case
    ho, wo = (out_size(n, k, s, p, d) for n in (h, w))
    return (b, c, h, w), (b, g, k * k, ho, wo), (k, s, p, d)


def dconv_shapes(case):
    b, cin, cout, h, w, (kh, kw), s, p, d, g = case
    return (b, cin, h, w), (b, cout, cin // g, kh, kw), (s, p, d, g)


def outlook_shapes(case):
    b, c, heads, h, w, k, p, s = case
    gh = (h + 2 * p - k) // s + 1
    gw = (w + 2 * p - k) // s + 1
    return (b, c, h, w), (b, heads, gh * gw, k * k, k * k), (k, p, s)


def outlook_kernel_plan(vs, attn_s, attrs, dynamic: bool = False):
    """What the op and the plugin launch for these shapes: ``(kernel name, entry, blocks, (grid, scalars,
    constexprs), scalar names, warps)``; the window-row kernel up to k=3, the pixel-block one above. With
    ``dynamic``, the blocks of a dynamic height and width; shapes may be symbolic."""
    k, p, s = attrs
    ch = vs[1] // attn_s[1]
    if outlook_plan.uses_rows(k):
        blocks = outlook_plan.rows_blocks(ch, None if dynamic else vs[3], k, s)
        lp = outlook_plan.rows_launch_plan(vs, attn_s, k, p, s, *blocks)
        return "_outlook_rows", outlook_trt.aot_rows_entry, blocks, lp, outlook_plan.ROWS_SCALARS, 8
    blocks = outlook_plan.blocks(ch, None if dynamic else vs[2] * vs[3])
    lp = outlook_plan.launch_plan(vs, attn_s, k, p, s, *blocks)
    return "_outlook_aggregate_fwd", outlook_trt.aot_entry, blocks, lp, outlook_plan.SCALARS, trt_plugins.NUM_WARPS


# ------------------------------------------------------------------------------------------ output shapes
@pytest.mark.parametrize("case", INVOLUTION_CASES)
def test_involution_output_shape_matches_fake_kernel(case):
    xs, ws, attrs = involution_shapes(case)
    expected = fake_shape(OPS.involution2d, xs, ws, args=attrs)
    assert evaluate(inv_plan.output_shape(sym_shape(xs), sym_shape(ws), *attrs)) == expected
    assert inv_plan.output_shape(xs, ws, *attrs) == expected


@pytest.mark.parametrize("case", DCONV_CASES)
def test_dynamic_conv_output_shape_matches_fake_kernel(case):
    xs, ws, (s, p, d, g) = dconv_shapes(case)
    expected = fake_shape(OPS.dynamic_conv2d, xs, ws, args=(list(s), list(p), list(d), g))
    as_arrays = [np.asarray(v, dtype=np.int32) for v in (s, p, d)]  # how tensorrt.plugin passes int lists
    assert evaluate(dconv_plan.output_shape(sym_shape(xs), sym_shape(ws), *as_arrays, g)) == expected
    assert dconv_plan.output_shape(xs, ws, s, p, d, g) == expected


@pytest.mark.parametrize("case", OUTLOOK_CASES)
def test_outlook_output_shape_matches_fake_kernel(case):
    vs, attn_s, attrs = outlook_shapes(case)
    expected = fake_shape(OPS.outlook_aggregate, vs, attn_s, args=attrs)
    assert evaluate(outlook_plan.output_shape(sym_shape(vs), sym_shape(attn_s), *attrs)) == expected


def test_shape_logic_never_needs_reflected_operators():
    # The double rejects `int op expr` and truth tests, as the real ShapeExpr does.
    with pytest.raises(TypeError):
        _ = 2 * Sym(3)
    with pytest.raises(TypeError):
        bool(Sym(3))
    # a negative constant is written as a subtraction; kernel sizes may be expressions (dynamic_conv)
    assert shape_expr.add(Sym(5), -7).value == -2
    assert shape_expr.conv_out(Sym(9), Sym(3), 2, 1, 2).value == out_size(9, 3, 2, 1, 2)
    assert shape_expr.cdiv(Sym(17), 8).value == 3


@pytest.mark.parametrize(
    ("module", "attrs"),
    [
        (inv_plan, (0, 1, 0, 1)),
        (inv_plan, (3, 1, -1, 1)),
        (outlook_plan, (3, 1, 0)),
        (dconv_plan, ([1], [0, 0], [1, 1], 1)),
        (dconv_plan, ([1, 1], [0, 0], [1, 1], 0)),
    ],
)
def test_bad_attributes_are_rejected_with_the_plugin_name(module, attrs):
    with pytest.raises(ValueError, match=module.PLUGIN_NAME):
        module.check_attributes(*attrs)


def test_attribute_order_matches_the_plugin_nodes():
    """The node's attribute order (after plugin_namespace/plugin_version) is the registered signature's."""
    nodes = {}
    for op, module in (("involution", inv_trt), ("dynamic_conv", dconv_trt), ("outlook", outlook_trt)):
        try:
            node = importlib.import_module(f"attn_export.plugins.{op}.plugin_node")
        except ImportError as e:  # pragma: no cover - the plugin-node export is another module's
            pytest.skip(f"plugin nodes unavailable: {e}")
        nodes[op] = node
        assert tuple(node.ATTRIBUTES) == module.ATTRIBUTES
    assert {m.PLUGIN_NAME for m in (inv_trt, dconv_trt, outlook_trt)} == set(PLUGINS.values())
    assert all(m.PLUGIN_ID.startswith(f"{NAMESPACE}::") for m in (inv_trt, dconv_trt, outlook_trt))


# ------------------------------------------------------------------------------------------ launch plans
class _Recorder:
    """Stands in for a Triton kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self) -> None:
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _record_launch(monkeypatch, module_name: str, kernel: str, call):
    mod = importlib.import_module(module_name)
    rec = _Recorder()
    monkeypatch.setattr(mod, kernel, rec)
    call(mod)
    assert len(rec.calls) == 1
    return rec.calls[0]


@pytest.mark.parametrize("case", INVOLUTION_CASES)
def test_involution_launch_plan_is_the_cuda_kernels_launchers(monkeypatch, case):
    pytest.importorskip("triton")
    xs, ws, attrs = involution_shapes(case)
    x, w = torch.zeros(xs), torch.zeros(ws)
    grid, args, kwargs = _record_launch(
        monkeypatch,
        "attn_export.plugins.involution.cuda_kernel",
        "_involution2d_fwd",
        lambda m: m.involution2d_cuda_tiles(x, w, *attrs),  # the tile kernel: the plugin's (the op runs rows)
    )
    block_c, block_p = inv_plan.blocks(xs[1] // ws[1], ws[3] * ws[4])
    plan_grid, scalars, constexprs = inv_plan.launch_plan(xs, ws, *attrs, block_c, block_p)
    assert grid == (plan_grid,)
    assert tuple(args[3:]) == scalars and len(scalars) == len(inv_plan.SCALARS)
    assert {k: v for k, v in kwargs.items() if k != "num_warps"} == constexprs
    assert kwargs["num_warps"] == trt_plugins.NUM_WARPS
    # the same plan from shape expressions (the AOT path) evaluates to the same numbers
    sym_grid, sym_scalars, _ = inv_plan.launch_plan(sym_shape(xs), sym_shape(ws), *attrs, block_c, block_p)
    assert (sym_grid.value, evaluate(sym_scalars)) == (plan_grid, scalars)


@pytest.mark.parametrize("case", DCONV_CASES)
def test_dynamic_conv_launch_plan_is_the_cuda_kernels_launchers(monkeypatch, case):
    pytest.importorskip("triton")
    xs, ws, (s, p, d, g) = dconv_shapes(case)
    x, w = torch.zeros(xs), torch.zeros(ws)
    grid, args, kwargs = _record_launch(
        monkeypatch,
        "attn_export.plugins.dynamic_conv.cuda_kernel",
        "_dynamic_conv2d_fwd",
        lambda m: m.dynamic_conv2d_cuda_fixed(x, w, s, p, d, g),
    )
    ho, wo = dconv_plan.output_shape(xs, ws, s, p, d, g)[2:]
    blocks = dconv_plan.blocks(ws[1] // g, ws[2], ho * wo)
    plan = dconv_plan.launch_plan(xs, ws, s, p, d, g, ws[3:], *blocks, dconv_plan.dot_precision("fp32"))
    plan_grid, scalars, constexprs = plan
    assert grid == (plan_grid,)
    assert tuple(args[3:]) == scalars and len(scalars) == len(dconv_plan.SCALARS)
    assert {k: v for k, v in kwargs.items() if k != "num_warps"} == constexprs
    sym = dconv_plan.launch_plan(sym_shape(xs), sym_shape(ws), s, p, d, g, ws[3:], *blocks, "ieee")
    assert (sym[0].value, evaluate(sym[1])) == (plan_grid, scalars)


@pytest.mark.parametrize("case", OUTLOOK_CASES)
def test_outlook_launch_plan_is_the_cuda_kernels_launchers(monkeypatch, case):
    pytest.importorskip("triton")
    vs, attn_s, attrs = outlook_shapes(case)
    v, a = torch.zeros(vs), torch.zeros(attn_s)
    name, _, blocks, (plan_grid, scalars, constexprs), names, warps = outlook_kernel_plan(vs, attn_s, attrs)
    grid, args, kwargs = _record_launch(
        monkeypatch,
        "attn_export.plugins.outlook.cuda_kernel",
        name,
        lambda m: m.outlook_aggregate_cuda(v, a, *attrs),
    )
    assert grid == (plan_grid,)
    assert tuple(args[3:]) == scalars and len(scalars) == len(names)
    assert {k: v for k, v in kwargs.items() if k != "num_warps"} == constexprs
    assert kwargs["num_warps"] == warps
    planner = outlook_plan.rows_launch_plan if name == "_outlook_rows" else outlook_plan.launch_plan
    sym = planner(sym_shape(vs), sym_shape(attn_s), *attrs, *blocks)
    assert (sym[0].value, evaluate(sym[1])) == (plan_grid, scalars)


def test_dynamic_sizes_take_the_largest_blocks():
    assert inv_plan.blocks(None, None) == (32, 128)
    assert dconv_plan.blocks(None, None, None) == (64, 16, 64)
    assert outlook_plan.blocks(None, None) == (32, 64)
    assert outlook_plan.rows_blocks(None, None, 3, 1) == (32, 32, 32, 8)
    assert outlook_plan.rows_blocks(None, None, 3, 2) == (32, 32, 16, 8)


# ------------------------------------------------------------------------------------------ kernels, run
def _kernel_device() -> str | None:
    triton = pytest.importorskip("triton")
    from attn_export.plugins.involution.cuda_kernel import _involution2d_fwd

    interpreted = type(_involution2d_fwd).__name__ == "InterpretedFunction"
    if triton.knobs.runtime.interpret and interpreted:
        return "cpu"
    if not triton.knobs.runtime.interpret and not interpreted and torch.cuda.is_available():
        return "cuda"
    return None


def _device():
    device = _kernel_device()
    if device is None:
        pytest.skip("needs TRITON_INTERPRET=1 set before the kernel modules are imported (CPU), or CUDA")
    return device


def _rand(gen, shape, device):
    return torch.randn(shape, generator=gen, dtype=torch.float64).float().to(device)


@pytest.mark.parametrize("case", INVOLUTION_CASES[:5])
def test_involution_aot_entry_and_jit_launch_match_reference(case):
    device = _device()
    gen = torch.Generator().manual_seed(1)
    xs, ws, attrs = involution_shapes(case)
    x, w = _rand(gen, xs, device), _rand(gen, ws, device)
    expected = inv_op.reference(x.double().cpu(), w.double().cpu(), *attrs)
    out = torch.full(expected.shape, float("nan"), device=device)
    inv_trt.launch(x, w, out, *attrs)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-4, rtol=1e-4)
    # the AOT entry, called as TensorRT calls it: inputs, the int32 scalars, the output
    block_c, block_p = inv_plan.blocks(xs[1] // ws[1], ws[3] * ws[4])
    grid, scalars, constexprs = inv_plan.launch_plan(xs, ws, *attrs, block_c, block_p)
    out2 = torch.full(expected.shape, float("nan"), device=device)
    inv_trt.aot_entry()[(grid,)](x, w, *scalars, out2, **constexprs, num_warps=trt_plugins.NUM_WARPS)
    torch.testing.assert_close(out2.cpu().double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", DCONV_CASES[:4])
def test_dynamic_conv_aot_entry_and_jit_launch_match_reference(case):
    device = _device()
    gen = torch.Generator().manual_seed(2)
    xs, ws, (s, p, d, g) = dconv_shapes(case)
    x, w = _rand(gen, xs, device), _rand(gen, ws, device)
    expected = dconv_op.reference(x.double().cpu(), w.double().cpu(), s, p, d, g)
    out = torch.full(expected.shape, float("nan"), device=device)
    dconv_trt.launch(x, w, out, np.asarray(s, np.int32), np.asarray(p, np.int32), np.asarray(d, np.int32), g)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-4, rtol=1e-4)
    ho, wo = expected.shape[2:]
    blocks = dconv_plan.blocks(ws[1] // g, ws[2], ho * wo)
    grid, scalars, constexprs = dconv_plan.launch_plan(xs, ws, s, p, d, g, ws[3:], *blocks, "ieee")
    out2 = torch.full(expected.shape, float("nan"), device=device)
    dconv_trt.aot_entry()[(grid,)](x, w, *scalars, out2, **constexprs, num_warps=trt_plugins.NUM_WARPS)
    torch.testing.assert_close(out2.cpu().double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", OUTLOOK_CASES[:3])
def test_outlook_aot_entry_and_jit_launch_match_reference(case):
    device = _device()
    gen = torch.Generator().manual_seed(3)
    vs, attn_s, attrs = outlook_shapes(case)
    v, a = _rand(gen, vs, device), _rand(gen, attn_s, device)
    expected = outlook_op.reference(v.double().cpu(), a.double().cpu(), *attrs)
    out = torch.full(expected.shape, float("nan"), device=device)
    outlook_trt.launch(v, a, out, *attrs)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-4, rtol=1e-4)
    _, entry, _, (grid, scalars, constexprs), _, warps = outlook_kernel_plan(vs, attn_s, attrs)
    out2 = torch.full(expected.shape, float("nan"), device=device)
    entry()[(grid,)](v, a, *scalars, out2, **constexprs, num_warps=warps)
    torch.testing.assert_close(out2.cpu().double(), expected, atol=1e-4, rtol=1e-4)


def test_launch_writes_into_a_non_contiguous_output():
    device = _device()
    gen = torch.Generator().manual_seed(4)
    xs, ws, attrs = involution_shapes(INVOLUTION_CASES[0])
    x, w = _rand(gen, xs, device), _rand(gen, ws, device)
    expected = inv_op.reference(x.double().cpu(), w.double().cpu(), *attrs)
    base = torch.zeros((expected.shape[0], expected.shape[1], expected.shape[3], expected.shape[2]), device=device)
    out = base.transpose(2, 3)
    inv_trt.launch(x, w, out, *attrs)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="expected"):
        inv_trt.launch(x, w, torch.empty(1, device=device), *attrs)


# ------------------------------------------------------------------------------------------ AOT compilation
_SYNTHETIC_PTX = """
.version 8.4
.target sm_80
.address_size 64
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3,
\t.param .u64 .ptr .global .align 1 k_param_4
)
.reqntid 128
{
\tld.param.u64 %rd1, [k_param_0];
\tld.param.u32 %r1, [k_param_1];
\tld.param.u64 %rd2, [k_param_2];
BODY
}
"""


def test_fit_ptx_params_drops_unused_trailing_parameters():
    ptx = _SYNTHETIC_PTX.replace("BODY", "ret;")
    fitted = trt_plugins.fit_ptx_params(ptx, 3)
    assert trt_plugins.ptx_params(fitted) == trt_plugins.ptx_params(ptx)[:3]
    assert "k_param_3" not in fitted and "k_param_4" not in fitted
    assert fitted.split(")", 1)[1] == ptx.split(")", 1)[1]  # the body is untouched
    assert trt_plugins.fit_ptx_params(ptx, 5) == ptx


def test_fit_ptx_params_refuses_parameters_the_kernel_uses():
    used = _SYNTHETIC_PTX.replace("BODY", "ld.param.u64 %rd3, [k_param_3];")
    with pytest.raises(trt_plugins.TensorRTError, match="hidden parameter"):
        trt_plugins.fit_ptx_params(used, 3)
    with pytest.raises(trt_plugins.TensorRTError, match=r"scratch|hidden"):
        trt_plugins.fit_ptx_params(_SYNTHETIC_PTX.replace("BODY", "ret;"), 3, scratch_free=False)
    with pytest.raises(trt_plugins.TensorRTError, match="TensorRT passes 6"):
        trt_plugins.fit_ptx_params(_SYNTHETIC_PTX, 6)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json
    from triton.backends.compiler import GPUTarget
    from attn_export.plugins import _trt_kit as trt
    from attn_export.plugins.dynamic_conv import trt_plugin as dconv
    from attn_export.plugins.involution import trt_plugin as inv
    from attn_export.plugins.outlook import trt_plugin as outl

    target = GPUTarget("cuda", 80, 32)
    kernels = {}
    for dtype in ("fp32", "fp16", "bf16"):
        kernels["involution2d", dtype] = inv.aot_kernel(dtype, 3, 2, 1, 1, 32, 128, target=target)
        kernels["dynamic_conv2d", dtype] = dconv.aot_kernel(
            dtype, (2, 1), (1, 0), (1, 2), (3, 2), 16, 16, 64, target=target
        )
        kernels["outlook_aggregate", dtype] = outl.aot_kernel(dtype, 3, 1, 2, 32, 64, target=target)
        kernels["outlook_rows", dtype] = outl.aot_rows_kernel(dtype, 3, 1, 2, 32, 32, 16, 8, target=target)
    mixed = ("fp16", "fp32", "fp16")  # x fp16, weight fp32 (a strongly typed graph may declare it)
    kernels["involution2d", "mixed"] = inv.aot_kernel(mixed, 3, 2, 1, 1, 32, 128, target=target)
    kernels["outlook_aggregate", "mixed"] = outl.aot_kernel(mixed, 3, 1, 2, 32, 64, target=target)
    kernels["outlook_rows", "mixed"] = outl.aot_rows_kernel(mixed, 3, 1, 2, 32, 32, 16, 8, target=target)
    out = {}
    for (op, dtype), k in kernels.items():
        ptx = k.ptx.decode()
        out[f"{op}/{dtype}"] = {
            "name": k.name, "block_x": k.block_x, "shared": k.shared_mem, "params": trt.ptx_params(ptx),
            "expected": k.params, "entry": f".entry {k.name}(" in ptx,
        }
    import os
    os.environ[trt.KEEP_PTX_PARAMS_ENV] = "1"
    inv.aot_kernel.cache_clear()
    kept = inv.aot_kernel("fp32", 3, 2, 1, 1, 32, 128, target=target)
    out["kept"] = {"params": trt.ptx_params(kept.ptx.decode())}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_aot_kernels_compile_with_exactly_the_parameters_tensorrt_passes():
    """Compiles PTX for sm_80 (Triton's own toolchain; no GPU needed), in a process without the interpreter:
    fp32, fp16, bf16, and mixed pointer types for the kernels that read every load as fp32."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        if "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
            pytest.skip("Triton's ptxas is not available here")
        pytest.fail(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[0][len("RESULT") :])
    expected_params = {
        "involution2d": inv_trt.N_PARAMS,
        "dynamic_conv2d": dconv_trt.N_PARAMS,
        "outlook_aggregate": outlook_trt.N_PARAMS,
        "outlook_rows": outlook_trt.N_PARAMS + 1,  # one more int32 scalar (column blocks)
    }
    warps = {"outlook_rows": 8}
    # with the switch, Triton's entry as it is: our parameters first, then any hidden ones (Triton >= 3.3)
    kept = result.pop("kept")["params"]
    assert kept[: inv_trt.N_PARAMS] == result["involution2d/fp32"]["params"]
    for key, info in result.items():
        op = key.split("/")[0]
        assert info["entry"], key
        assert info["name"] == f"{op}_aot", key
        assert info["block_x"] == 32 * warps.get(op, trt_plugins.NUM_WARPS), key
        assert len(info["params"]) == info["expected"] == expected_params[op], (key, info["params"])
        kinds = [".u64" in p for p in info["params"]]  # pointers: inputs first, the output last
        assert kinds == [True, True] + [False] * (expected_params[op] - 3) + [True], (key, info["params"])
    assert result["dynamic_conv2d/fp32"]["shared"] > 0  # tl.dot tiles go through shared memory


def test_compile_aot_refuses_interpreted_kernels():
    pytest.importorskip("triton")
    interpreted = types.SimpleNamespace(fn=lambda: None)  # anything but a triton.JITFunction
    with pytest.raises(trt_plugins.TensorRTError, match="TRITON_INTERPRET"):
        trt_plugins.compile_aot(interpreted, {}, {}, 0)


def test_ptx_version_option_is_validated(monkeypatch):
    monkeypatch.setenv(trt_plugins.PTX_VERSION_ENV, "8.4")
    with pytest.raises(trt_plugins.TensorRTError, match="digits"):
        _trt_kit._ptx_version_option()
    monkeypatch.setenv(trt_plugins.PTX_VERSION_ENV, "84")
    assert _trt_kit._ptx_version_option() == 84


# ------------------------------------------------------------------------------------------ imports, errors
def test_importing_the_plugin_modules_imports_neither_tensorrt_nor_triton():
    code = textwrap.dedent(
        """
        import sys
        import attn_export.plugins
        import attn_export.plugins.trt
        import attn_export.plugins.involution.trt_plugin
        import attn_export.plugins.dynamic_conv.trt_plugin
        import attn_export.plugins.outlook.trt_plugin
        import attn_export.export.trt_build
        import attn_export.runtime.trt_runner
        print(sorted(m for m in ("tensorrt", "triton") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_register_raises_a_clear_error_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails as if not installed
    with pytest.raises(trt_plugins.TensorRTError, match=r"TensorRT is not installed.*pip install tensorrt"):
        trt_plugins.register_trt_plugins()
    assert not trt_plugins.tensorrt_available()
    assert trt_plugins.tensorrt_version() is None
    assert trt_plugins.plugin_mode() is None


def test_register_raises_a_clear_error_for_an_old_tensorrt(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0.26"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(trt_plugins.TensorRTError, match=r"10\.3\.0\.26 is too old.*>= 10\.6"):
        trt_plugins.register_trt_plugins()
    assert not trt_plugins.tensorrt_available()


def test_register_refuses_aot_before_10_9(monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.7.0"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(trt_plugins.TensorRTError, match=r"AOT.*10\.9"):
        trt_plugins.register_trt_plugins(aot=True)


def test_parse_version():
    assert trt_plugins.parse_version("10.9.0.34") == (10, 9, 0, 34)
    assert trt_plugins.parse_version("11.4.0rc1") == (11, 4, 0)
    assert trt_plugins.parse_version("10.13.2.post1") == (10, 13, 2)


# ------------------------------------------------------------------------------------------ with TensorRT
PLUGIN_CASES = [
    ("involution", INVOLUTION_CASES[1]),
    ("involution", INVOLUTION_CASES[5]),
    ("dynamic_conv", DCONV_CASES[1]),
    ("dynamic_conv", DCONV_CASES[4]),
    ("outlook", OUTLOOK_CASES[1]),
    ("outlook", OUTLOOK_CASES[3]),
]


def _plugin_case(kind, case):
    """(plugin module, input shapes, the plugin's attribute kwargs, reference(a, b) in float64)."""
    if kind == "involution":
        xs, ws, (k, s, p, d) = involution_shapes(case)
        attrs = {"kernel_size": k, "stride": s, "padding": p, "dilation": d}
        return inv_trt, (xs, ws), attrs, lambda a, b: inv_op.reference(a, b, k, s, p, d)
    if kind == "dynamic_conv":
        xs, ws, (s, p, d, g) = dconv_shapes(case)
        arr = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
        attrs = {"stride": arr(s), "padding": arr(p), "dilation": arr(d), "groups": g}
        return dconv_trt, (xs, ws), attrs, lambda a, b: dconv_op.reference(a, b, s, p, d, g)
    vs, attn_s, (k, p, s) = outlook_shapes(case)
    attrs = {"kernel_size": k, "padding": p, "stride": s}
    return outlook_trt, (vs, attn_s), attrs, lambda a, b: outlook_op.reference(a, b, k, p, s)


# ------------------------------------------------------------------------------------------ the real tensorrt.plugin
# tensorrt.plugin's own Python sources (from the tensorrt-cu13-bindings wheel, downloaded once and cached)
# run against a stand-in for TensorRT's compiled module (tests/trt_api.py): registration, validation,
# autotune expansion, the plugin creator and the AOT launch parameters are TensorRT's code, not ours.
import trt_api  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)

TRT_VERSIONS = ["10.13.2.6", "11.4.0.106"]
PLUGIN_MODULES = {inv_trt.PLUGIN_NAME: inv_trt, dconv_trt.PLUGIN_NAME: dconv_trt, outlook_trt.PLUGIN_NAME: outlook_trt}


@pytest.fixture(scope="module")
def bindings():
    try:
        return trt_api.bindings_dir()
    except trt_api.Unavailable as e:
        pytest.skip(f"tensorrt.plugin sources unavailable (PyPI unreachable?): {e}")


@pytest.fixture(params=TRT_VERSIONS)
def real_trtp(request, bindings):
    """``(trt stand-in, the real tensorrt.plugin)`` of one TensorRT version, fresh for each test."""
    with trt_api.installed(request.param) as pair:
        yield pair


def _node_fields(trt, creator, attrs: dict):
    """The plugin fields as TensorRT's ONNX parser builds them: in the creator's field order, ints as
    INT32 (one element), int lists as INT32 arrays."""
    fields = []
    for f in creator.field_names:
        value = attrs[f.name]
        data = np.asarray(value, dtype=np.int32).reshape(-1)
        fields.append(trt.PluginField(f.name, data, trt.PluginFieldType.INT32))
    return fields


def _plugin_attrs(kind, case):
    """(module, input shapes, the node's attributes as the exporter writes them) of one case."""
    module, shapes, attrs, _ = _plugin_case(kind, case)
    return module, shapes, {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}


def _create(trt, trtp, module, attrs, request="PREFER_AOT"):
    creator = trt.get_plugin_registry().get_creator(module.PLUGIN_NAME, "1", NAMESPACE)
    fields = _node_fields(trt, creator, attrs)
    qpcr = getattr(trt.QuickPluginCreationRequest, request) if request else None
    args = (module.PLUGIN_NAME, NAMESPACE, fields, trt.TensorRTPhase.BUILD)
    return creator.create_plugin(*args, qpcr) if qpcr is not None else creator.create_plugin(*args)


def _shape_and_types(trt, plugin, shapes, dtypes):
    """Run the build-time calls TensorRT makes first: output types, then output shapes (int expressions)."""
    out_types = plugin.get_output_data_types(list(dtypes), [len(s) for s in shapes])
    builder = trt_api.ExprBuilder(trt)
    dims = [[trt_api.IDimensionExpr(d) for d in s] for s in shapes]
    out_dims = plugin.get_output_shapes(dims, [], builder)
    return out_types, tuple(e.value for e in out_dims[0])


def _combinations(trt, plugin, shapes, out_shape):
    in_out = [trt_api.DynamicPluginTensorDesc(s, None, trt.TensorFormat.LINEAR) for s in (*shapes, out_shape)]
    descs = plugin.get_supported_format_combinations(in_out, len(shapes))
    n = len(in_out)
    return {tuple(d.type.name for d in descs[i : i + n]) for i in range(0, len(descs), n)}


@pytest.mark.parametrize("aot", [None, False])
def test_real_tensorrt_plugin_registers_the_three_plugins(real_trtp, aot):
    trt, trtp = real_trtp
    mode = trt_plugins.register_trt_plugins(aot=aot)
    assert mode == ("aot" if aot is None else "jit") == trt_plugins.plugin_mode()
    registry = trt.get_plugin_registry()
    for name, module in PLUGIN_MODULES.items():
        pdef = trt_plugins.plugin_definition(trtp, name)
        assert pdef.impl_func is not None and pdef.autotune_func is not None
        assert (pdef.aot_impl_func is not None) == (aot is None)
        creator = registry.get_creator(name, "1", NAMESPACE)
        # the creator's fields (what onnx-tensorrt walks) come in the registered signature's order, and the
        # plugin node writes its attributes in that order too (the invariant docs/tensorrt.md states)
        assert tuple(f.name for f in creator.field_names) == module.ATTRIBUTES == tuple(pdef.input_attrs)
        assert attribute_order(name)[2:] == module.ATTRIBUTES
    assert trt_plugins.register_trt_plugins(aot=aot) == mode  # idempotent
    if aot is False:  # a later call adds the AOT implementations
        assert trt_plugins.register_trt_plugins(aot=True) == "aot"


def test_tensorrt_without_aot_registers_jit_only(bindings):
    with trt_api.installed("10.8.0.43", aot=False) as (_, trtp):
        assert trt_plugins.register_trt_plugins() == "jit"
        assert not any(i["aot"] for i in trt_plugins.registered_implementations(trtp).values())
        with pytest.raises(trt_plugins.TensorRTError, match="AOT"):
            trt_plugins.register_trt_plugins(aot=True)


def test_a_definition_made_elsewhere_is_reported_as_it_is(real_trtp):
    """Someone defined AttnExportInvolution2d (JIT only) first: the mode says jit, as TensorRT will run it."""
    trt, trtp = real_trtp
    ns = f"{NAMESPACE}::{inv_trt.PLUGIN_NAME}"

    # (not in this file: its `from __future__ import annotations` would hide the annotation objects)
    code = textwrap.dedent(
        """
        @trtp.register(ns)
        def other_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, kernel_size: int) -> trtp.TensorDesc:
            return x.like()

        @trtp.impl(ns)
        def other_impl(x: trtp.Tensor, weight: trtp.Tensor, kernel_size: int, outputs: tuple[trtp.Tensor], stream: int):
            pass
        """
    )
    scope = {"trtp": trtp, "ns": ns, "__name__": "someone_else"}
    exec(compile(code, "someone_else.py", "exec", dont_inherit=True), scope)
    other_desc = scope["other_desc"]

    assert trt_plugins.register_trt_plugins() == "jit"
    assert trt_plugins.plugin_definition(trtp, inv_trt.PLUGIN_NAME).register_func is other_desc  # left alone
    with pytest.raises(trt_plugins.TensorRTError, match=r"AttnExportInvolution2d.*without an AOT"):
        trt_plugins.register_trt_plugins(aot=True)
    # what TensorRT does with PREFER_AOT for it: the JIT plugin, silently (the metadata must not say aot)
    creator = trt.get_plugin_registry().get_creator(inv_trt.PLUGIN_NAME, "1", NAMESPACE)
    fields = [trt.PluginField("kernel_size", np.array([3], np.int32), trt.PluginFieldType.INT32)]
    plugin = creator.create_plugin(
        inv_trt.PLUGIN_NAME, NAMESPACE, fields, trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.PREFER_AOT
    )
    assert type(plugin).__name__ == "_TemplateJITPlugin"
    # ours, defined by register_trt_plugins, are AOT under the same request
    plugin = _create(trt, trtp, dconv_trt, _plugin_attrs("dynamic_conv", DCONV_CASES[0])[2])
    assert type(plugin).__name__ == "_TemplateAOTPlugin"


@pytest.mark.parametrize(("kind", "case"), PLUGIN_CASES)
def test_output_shapes_and_autotune_through_tensorrt_plugin(real_trtp, kind, case):
    trt, trtp = real_trtp
    trt_plugins.register_trt_plugins()
    module, shapes, attrs = _plugin_attrs(kind, case)
    op = {"involution": OPS.involution2d, "dynamic_conv": OPS.dynamic_conv2d, "outlook": OPS.outlook_aggregate}[kind]
    expected = fake_shape(op, *shapes, args=tuple(attrs.values()))
    D = trt.DataType
    uniform = {("FLOAT",) * 3, ("HALF",) * 3, ("BF16",) * 3}
    for dtypes, extra in [
        ((D.FLOAT, D.FLOAT), set()),
        ((D.BF16, D.BF16), set()),
        ((D.HALF, D.FLOAT), {("HALF", "FLOAT", "HALF")}),  # mixed, as a strongly typed graph may declare
        ((D.FLOAT, D.BF16), {("FLOAT", "BF16", "FLOAT")}),
    ]:
        plugin = _create(trt, trtp, module, attrs)
        out_types, out_shape = _shape_and_types(trt, plugin, shapes, dtypes)
        assert out_types == [dtypes[0]] and out_shape == expected
        assert _combinations(trt, plugin, shapes, out_shape) == uniform | extra


@pytest.mark.parametrize(("kind", "case"), PLUGIN_CASES)
@pytest.mark.parametrize("types", [("FLOAT",) * 3, ("HALF",) * 3, ("BF16",) * 3, ("HALF", "FLOAT", "HALF")])
def test_aot_launch_parameters_through_tensorrt_plugin(real_trtp, monkeypatch, kind, case, types):
    """TensorRT's AOT plugin class calls our aot_impl with every attribute positionally, in the creator's
    field order; the grid and the int32 scalars it gets evaluate to the launch plan the kernel needs."""
    trt, trtp = real_trtp
    trt_plugins.register_trt_plugins()
    module, shapes, attrs = _plugin_attrs(kind, case)
    compiled = []
    real_aot_kernel = module.aot_kernel

    def fake_aot_kernel(dtype, *args, **kwargs):  # no Triton compilation here: record what it was asked
        compiled.append((dtype, args))
        if module is dconv_trt and dtype[0] != dtype[1]:
            return real_aot_kernel(dtype, *args, **kwargs)  # the real refusal, before any compilation
        return _trt_kit.AOTKernel(f"{kind}_aot", b"// ptx", 128, 1024, module.N_PARAMS)

    monkeypatch.setattr(module, "aot_kernel", fake_aot_kernel)
    if module is outlook_trt:
        monkeypatch.setattr(module, "aot_rows_kernel", fake_aot_kernel)
    plugin = _create(trt, trtp, module, attrs)
    dtypes = [getattr(trt.DataType, t) for t in types]
    _, out_shape = _shape_and_types(trt, plugin, shapes, dtypes[:2])
    plugin.set_tactic(0)
    in_out = [
        trt_api.DynamicPluginTensorDesc(s, t, trt.TensorFormat.LINEAR)
        for s, t in zip((*shapes, out_shape), dtypes, strict=True)
    ]
    launch, setter = trt_api.Holder(), trt_api.Holder()
    in_dims = [[trt_api.IDimensionExpr(d) for d in s] for s in shapes]
    if module is dconv_trt and types[0] != types[1]:
        with pytest.raises(trt_plugins.TensorRTError, match=r"tl\.dot"):
            plugin.get_launch_params(in_dims, in_out, 2, launch, setter, trt_api.ExprBuilder(trt))
        return
    plugin.get_launch_params(in_dims, in_out, 2, launch, setter, trt_api.ExprBuilder(trt))
    names = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
    assert compiled[0][0] == tuple(names[t] for t in types)
    a, b = shapes
    if module is inv_trt:
        blocks = inv_plan.blocks(a[1] // b[1], b[3] * b[4])
        grid, scalars, _ = inv_plan.launch_plan(a, b, *attrs.values(), *blocks)
    elif module is dconv_trt:
        s, p, d, g = attrs.values()
        ho, wo = out_shape[2:]
        blocks = dconv_plan.blocks(b[1] // g, b[2], ho * wo)
        grid, scalars, _ = dconv_plan.launch_plan(a, b, s, p, d, g, b[3:], *blocks, None)
    else:
        _, _, blocks, (grid, scalars, _), names, _ = outlook_kernel_plan(a, b, tuple(attrs.values()))
    assert compiled[0][1][-len(blocks) :] == blocks
    assert launch.grid_x.expr.value == grid and launch.block_x.expr.value == 128
    assert launch.shared_mem.expr.value == 1024
    n_scalars = len(names if module is outlook_trt else {inv_trt: inv_plan, dconv_trt: dconv_plan}[module].SCALARS)
    assert setter.nbSymExprs == n_scalars
    assert [setter.items[i].expr.value for i in range(n_scalars)] == list(scalars)
    assert all(setter.items[i].dtype == trt.PluginArgDataType.INT32 for i in range(n_scalars))


# ------------------------------------------------------------------------------------------ symbolic H and W
#: Run-time (batch, height, width) of the symbolic tests: odd, non-square, not multiples of 2 or 3.
RUNTIME_SIZES = ((1, 13, 10), (2, 7, 17), (3, 16, 11))
OPS_BY_KIND = {"involution": OPS.involution2d, "dynamic_conv": OPS.dynamic_conv2d, "outlook": OPS.outlook_aggregate}


def _at(case, b: int, h: int, w: int):
    """``case`` at another batch, height and width (every case tuple starts ``B, _, _, H, W``)."""
    return (b, *case[1:3], h, w, *case[5:])


def _symbolic_dims(kind, case):
    """The plugin's input dims as TensorRT gives them for a profile over B, H and W: an expression of the
    run-time sizes wherever the dim depends on them (the second input's spatial dims are what upstream
    layers compute from H and W), a constant elsewhere; and the dims of its ``TensorDesc`` (-1: dynamic)."""
    shapes = [_plugin_attrs(kind, _at(case, *size))[1] for size in RUNTIME_SIZES]
    exprs, dims = [], []
    for i in range(len(shapes[0])):
        row_e, row_d = [], []
        for j, d in enumerate(shapes[0][i]):
            if all(s[i][j] == d for s in shapes):
                row_e.append(trt_api.IDimensionExpr(d))
                row_d.append(d)
                continue

            def value(sizes, i=i, j=j):
                return _plugin_attrs(kind, _at(case, sizes["B"], sizes["H"], sizes["W"]))[1][i][j]

            row_e.append(trt_api.SymbolicDimExpr(value, f"in{i}[{j}]"))
            row_d.append(-1)
        exprs.append(row_e)
        dims.append(tuple(row_d))
    return exprs, dims


@pytest.mark.parametrize(("kind", "case"), PLUGIN_CASES)
def test_symbolic_height_and_width_through_tensorrt_plugin(real_trtp, monkeypatch, kind, case):
    """A profile over batch, height and width: the output shape expressions, the AOT grid and the int32
    scalars TensorRT gets are expressions that, evaluated at run-time sizes unlike any build-time one,
    give the fake kernel's shape and the launch plan of those sizes; the blocks are the dynamic-size
    ones (compiled once, for every size)."""
    trt, trtp = real_trtp
    trt_plugins.register_trt_plugins()
    module, _, attrs = _plugin_attrs(kind, case)
    plan = {inv_trt: inv_plan, dconv_trt: dconv_plan, outlook_trt: outlook_plan}[module]
    compiled = []

    def fake_aot_kernel(dtype, *args, **kwargs):
        compiled.append(args)
        return _trt_kit.AOTKernel(f"{kind}_aot", b"// ptx", 128, 1024, module.N_PARAMS)

    monkeypatch.setattr(module, "aot_kernel", fake_aot_kernel)
    if module is outlook_trt:
        monkeypatch.setattr(module, "aot_rows_kernel", fake_aot_kernel)
    plugin = _create(trt, trtp, module, attrs)
    exprs, dims = _symbolic_dims(kind, case)
    assert any(-1 in d[2:] for d in dims)  # H and W really are dynamic here
    D = trt.DataType
    plugin.get_output_data_types([D.FLOAT, D.FLOAT], [len(d) for d in dims])
    (out_exprs,) = plugin.get_output_shapes(exprs, [], trt_api.ExprBuilder(trt))
    out_dims = tuple(e.get_constant_value() if e.is_constant() else -1 for e in out_exprs)
    plugin.set_tactic(0)
    in_out = [trt_api.DynamicPluginTensorDesc(d, D.FLOAT, trt.TensorFormat.LINEAR) for d in (*dims, out_dims)]
    launch, setter = trt_api.Holder(), trt_api.Holder()
    plugin.get_launch_params(exprs, in_out, 2, launch, setter, trt_api.ExprBuilder(trt))
    a0, b0 = dims
    if module is inv_trt:
        blocks = inv_plan.blocks(a0[1] // b0[1], None)
    elif module is dconv_trt:
        blocks = dconv_plan.blocks(b0[1] // attrs["groups"], b0[2], None)
    else:
        _, _, blocks, _, names, _ = outlook_kernel_plan(a0, b0, tuple(attrs.values()), dynamic=True)
    assert compiled[0][-len(blocks) :] == blocks  # the blocks of a dynamic size: one kernel for every size
    assert not launch.grid_x.expr.is_constant() and not out_exprs[2].is_constant()
    n_scalars = len(names if module is outlook_trt else plan.SCALARS)
    for b, h, w in RUNTIME_SIZES:
        sizes = {"B": b, "H": h, "W": w}
        _, (xs, ws), _ = _plugin_attrs(kind, _at(case, b, h, w))
        args = tuple(attrs.values())
        assert tuple(e.evaluate(sizes) for e in out_exprs) == fake_shape(OPS_BY_KIND[kind], xs, ws, args=args)
        if module is dconv_trt:
            s, p, d, g = args
            grid, scalars, _ = dconv_plan.launch_plan(xs, ws, s, p, d, g, ws[3:], *blocks, None)
        elif module is outlook_trt:
            _, _, _, (grid, scalars, _), _, _ = outlook_kernel_plan(xs, ws, args, dynamic=True)
        else:
            grid, scalars, _ = plan.launch_plan(xs, ws, *args, *blocks)
        assert launch.grid_x.expr.evaluate(sizes) == grid, (b, h, w)
        assert [setter.items[i].expr.evaluate(sizes) for i in range(n_scalars)] == list(scalars), (b, h, w)


@pytest.mark.parametrize(("kind", "case"), PLUGIN_CASES[::2])
def test_aot_entries_with_dynamic_size_blocks_at_odd_sizes(kind, case):
    """The AOT entry compiled for a dynamic height and width (the largest blocks) is right at sizes that
    fill no block: run as TensorRT launches it, with the grid and scalars of the run-time size."""
    device = _device()
    gen = torch.Generator().manual_seed(5)
    module, (xs, ws), attrs, reference = _plugin_case(kind, _at(case, 2, 13, 10))
    a, b = _rand(gen, xs, device), _rand(gen, ws, device)
    expected = reference(a.double().cpu(), b.double().cpu())
    args = tuple(attrs.values())
    if module is inv_trt:
        grid, scalars, constexprs = inv_plan.launch_plan(xs, ws, *args, *inv_plan.blocks(xs[1] // ws[1], None))
    elif module is dconv_trt:
        s, p, d, g = (tuple(int(v) for v in x) if isinstance(x, np.ndarray) else x for x in args)
        blocks = dconv_plan.blocks(ws[1] // g, ws[2], None)
        grid, scalars, constexprs = dconv_plan.launch_plan(xs, ws, s, p, d, g, ws[3:], *blocks, "ieee")
    entry, warps = module.aot_entry, trt_plugins.NUM_WARPS
    if module is outlook_trt:
        _, entry, _, (grid, scalars, constexprs), _, warps = outlook_kernel_plan(xs, ws, args, dynamic=True)
    out = torch.full(expected.shape, float("nan"), device=device)
    entry()[(grid,)](a, b, *scalars, out, **constexprs, num_warps=warps)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("kind", "case"), PLUGIN_CASES[::2])
def test_jit_impl_gets_the_attributes_through_tensorrt_plugin(real_trtp, monkeypatch, kind, case):
    trt, trtp = real_trtp
    trt_plugins.register_trt_plugins(aot=False)
    module, shapes, attrs = _plugin_attrs(kind, case)
    calls = []
    monkeypatch.setattr(_trt_kit, "run_jit", lambda *args: calls.append(args))
    plugin = _create(trt, trtp, module, attrs, request=None)
    assert type(plugin).__name__ == "_TemplateJITPlugin"
    _, out_shape = _shape_and_types(trt, plugin, shapes, [trt.DataType.BF16] * 2)
    plugin.set_tactic(0)
    descs = [trt_api.PluginTensorDesc() for _ in range(3)]
    for d, s in zip(descs, (*shapes, out_shape), strict=True):
        d.dims, d.type, d.format = s, trt.DataType.BF16, trt.TensorFormat.LINEAR
    plugin.enqueue(descs[:2], descs[2:], [1000, 2000], [3000], [(1,)] * 2, [(1,)], 77)
    ((launch, inputs, outputs, stream, *got),) = calls
    assert launch is module.launch and stream == 77
    assert [t.data_ptr for t in inputs] == [1000, 2000] and outputs[0].data_ptr == 3000
    assert [np.asarray(v).tolist() for v in got] == [np.asarray(v).tolist() for v in attrs.values()]
    assert [type(v) for v in got] == [np.ndarray if isinstance(v, list) else int for v in attrs.values()]


def test_bf16_buffers_reach_torch_without_cuda_array_interface(real_trtp):
    """tensorrt.plugin.Tensor refuses bf16 in __cuda_array_interface__; ours describes it as int16."""
    trt, trtp = real_trtp
    t = trtp.Tensor()
    t.dtype, t.shape, t.strides, t.data_ptr = trt.DataType.BF16, trtp.Shape((2, 3)), (3, 1), 4096
    with pytest.raises(ValueError, match="not supported"):
        _ = t.__cuda_array_interface__
    desc, torch_name = trt_plugins.cuda_array_interface(trt, t)
    assert torch_name == "bfloat16" and desc["typestr"] == "<i2"
    assert desc["shape"] == (2, 3) and desc["strides"] == (6, 2) and desc["data"] == (4096, False)
    for dtype, name in ((trt.DataType.FLOAT, "float32"), (trt.DataType.HALF, "float16")):
        t = trtp.Tensor()
        t.dtype, t.shape, t.strides, t.data_ptr, t._stream = dtype, trtp.Shape((4, 5)), (5, 1), 8192, 0
        real = t.__cuda_array_interface__
        desc, torch_name = trt_plugins.cuda_array_interface(trt, t)
        assert torch_name == name
        assert {k: real[k] for k in desc} == desc  # the same description TensorRT's own gives


def test_jit_launch_takes_bf16_and_mixed_inputs():
    """The JIT body on torch tensors (CPU here: the op's reference; CUDA: its kernels) in bf16, and with
    the weight in another type than x (cast to the output's type first)."""
    gen = torch.Generator().manual_seed(6)
    xs, ws, attrs = involution_shapes(INVOLUTION_CASES[1])
    x, w = _rand(gen, xs, "cpu"), _rand(gen, ws, "cpu")
    expected = inv_op.reference(x.double(), w.double(), *attrs)
    out = torch.full(expected.shape, float("nan"), dtype=torch.bfloat16)
    inv_trt.launch(x.bfloat16(), w.bfloat16(), out, *attrs)
    torch.testing.assert_close(out.double(), expected, atol=0.1, rtol=0.02)
    out32 = torch.full(expected.shape, float("nan"))
    inv_trt.launch(x, w.half(), out32, *attrs)  # fp32 x, fp16 weight: the output is fp32
    ref16 = inv_op.reference(x.double(), w.half().double(), *attrs)
    torch.testing.assert_close(out32.double(), ref16, atol=1e-5, rtol=1e-5)
    vs, a_s, o_attrs = outlook_shapes(OUTLOOK_CASES[1])
    v, a = _rand(gen, vs, "cpu"), _rand(gen, a_s, "cpu")
    out = torch.full(vs, float("nan"), dtype=torch.float16)
    outlook_trt.launch(v.half(), a, out, *o_attrs)
    torch.testing.assert_close(
        out.double(), outlook_op.reference(v.half().double(), a.half().double(), *o_attrs), atol=2e-2, rtol=2e-3
    )


def test_the_attribute_order_text_names_the_real_invariant():
    """docs/tensorrt.md and attribute_order say why the order matters: the parser walks the creator's fields
    (the signature's order) and the AOT plugin passes them positionally; not "in the node's order"."""
    root = Path(__file__).resolve().parents[2]
    docs = " ".join((root / "docs" / "tensorrt.md").read_text().split())
    assert "creator's field list" in docs and "positionally" in docs
    assert "the node's order must equal the signature's" in docs
    assert "in the node's order, which the AOT implementation relies" not in docs
    doc = " ".join(attribute_order.__doc__.split())
    assert "the node's order equals the signature's" in doc and "creator's field list" in doc


def test_aot_kernels_over_48_kib_of_shared_memory_are_refused(monkeypatch):
    trt_plugins.check_shared_memory("k", 48 * 1024)
    with pytest.raises(trt_plugins.TensorRTError, match=r"k needs 65536 bytes.*JIT"):
        trt_plugins.check_shared_memory("k", 64 * 1024)
    monkeypatch.setenv(trt_plugins.LARGE_SHARED_ENV, "1")
    trt_plugins.check_shared_memory("k", 64 * 1024)


@pytest.mark.trt
def test_register_is_idempotent_and_defines_the_three_plugins():
    import tensorrt.plugin as trtp

    mode = trt_plugins.register_trt_plugins()
    assert mode in ("aot", "jit")
    assert trt_plugins.register_trt_plugins() == mode
    namespace = getattr(trtp.op, NAMESPACE)
    for name in PLUGINS.values():
        assert hasattr(namespace, name)
    assert trt_plugins.tensorrt_available()


#: Input types of the engine tests: (x, weight); the output takes x's type.
ENGINE_TYPES = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "bfloat16"), "mixed": ("float16", "float32")}
#: Tolerance (atol = rtol) of the engine tests by output type.
ENGINE_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def _plugin_engine(tmp_path, mode, kind, case, types, name="plugin"):
    """Build one plugin layer with the TensorRT API (in ``mode``), run it with TensorRTRunner; return
    ``(output, float64 reference of the inputs as the engine saw them, output type)``."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from attn_export.runtime.trt_runner import TensorRTRunner

    registered = trt_plugins.register_trt_plugins()  # both JIT and AOT where TensorRT has AOT
    if mode == "aot" and registered != "aot":
        pytest.skip(f"TensorRT {trt.__version__} has no AOT plugins")
    module, (sa, sb), attrs, reference = _plugin_case(kind, case)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "PREFER_AOT_PYTHON_PLUGINS"):
        flag = creation.PREFER_AOT_PYTHON_PLUGINS if mode == "aot" else creation.PREFER_JIT_PYTHON_PLUGINS
        flags |= 1 << int(flag)
    network = builder.create_network(flags)
    trt_types = {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16}
    a = network.add_input("a", trt_types[types[0]], sa)
    b = network.add_input("b", trt_types[types[1]], sb)
    op = getattr(getattr(trtp.op, NAMESPACE), module.PLUGIN_NAME)
    layer = network.add_plugin(op(a, b, **attrs))
    layer.get_output(0).name = "y"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    for t in set(types) - {"float32"}:  # TensorRT 10 (weak typing) uses half types only when allowed
        flag = {"float16": "FP16", "bfloat16": "BF16"}[t]
        if hasattr(trt.BuilderFlag, flag):
            config.set_flag(getattr(trt.BuilderFlag, flag))
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None
    engine_path = tmp_path / f"{name}.engine"
    engine_path.write_bytes(bytes(serialized))

    runner = TensorRTRunner(engine_path)
    gen = torch.Generator().manual_seed(5)
    xa = torch.randn(sa, generator=gen, dtype=torch.float64).to(getattr(torch, types[0])).double()
    xb = torch.randn(sb, generator=gen, dtype=torch.float64).to(getattr(torch, types[1])).double()
    got = runner.infer({"a": xa.float().numpy(), "b": xb.float().numpy()})["y"]
    return got, reference(xa, xb).numpy(), types[0]


@pytest.mark.trt
@pytest.mark.parametrize("types", list(ENGINE_TYPES))
@pytest.mark.parametrize("mode", ["jit", "aot"])
@pytest.mark.parametrize(("kind", "case"), PLUGIN_CASES)
def test_plugin_engine_matches_reference(tmp_path, mode, kind, case, types):
    """One plugin layer in an engine, in fp32, bf16 and mixed input types, JIT and AOT, with both
    implementations registered in the process that builds and runs it (TensorRTRunner registers both).
    The AOT engines run Triton's PTX with the hidden pointer parameters stripped from its entry."""
    if kind == "dynamic_conv" and mode == "aot" and types == "mixed":
        pytest.skip("dynamic_conv's AOT kernel takes x and weight of one type (tl.dot)")
    got, ref, out_type = _plugin_engine(tmp_path, mode, kind, case, ENGINE_TYPES[types])
    tol = ENGINE_TOL[out_type]
    np.testing.assert_allclose(got, ref, atol=tol * max(1.0, np.abs(ref).max()), rtol=tol)


@pytest.mark.trt
def test_aot_kernel_with_large_shared_memory(tmp_path, monkeypatch):
    """Settles whether TensorRT raises the shared-memory limit for an AOT kernel needing > 48 KiB: the
    dynamic-conv kernel with large tiles, let through by ATTN_EXPORT_AOT_LARGE_SHARED=1. If this passes,
    trt.check_shared_memory can go; if the engine fails to launch, keep it."""
    monkeypatch.setenv(trt_plugins.LARGE_SHARED_ENV, "1")
    monkeypatch.setattr(dconv_trt, "blocks", lambda cout_g, cin_g, howo: (64, 64, 128))
    dconv_trt.aot_kernel.cache_clear()
    case = (2, 64, 64, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    shared = []
    real = dconv_trt.aot_kernel

    def recording(*args, **kwargs):
        kernel = real(*args, **kwargs)
        shared.append(kernel.shared_mem)
        return kernel

    monkeypatch.setattr(dconv_trt, "aot_kernel", recording)
    got, ref, _ = _plugin_engine(tmp_path, "aot", "dynamic_conv", case, ("float32", "float32"), "smem")
    if not shared or max(shared) <= trt_plugins.STATIC_SHARED_LIMIT:
        pytest.skip(f"the kernel needed {max(shared, default=0)} bytes, not more than 48 KiB: nothing settled")
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
