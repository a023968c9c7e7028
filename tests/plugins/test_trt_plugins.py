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

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attn_export.plugins  # noqa: F401  (registers the torch ops)
from attn_export.plugins import trt as trt_plugins
from attn_export.plugins._trt_names import NAMESPACE, PLUGINS
from attn_export.plugins.dynamic_conv import op as dconv_op
from attn_export.plugins.dynamic_conv import trt_plugin as dconv_trt
from attn_export.plugins.involution import op as inv_op
from attn_export.plugins.involution import trt_plugin as inv_trt
from attn_export.plugins.outlook import op as outlook_op
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
    ho, wo = (inv_op.out_size(n, k, s, p, d) for n in (h, w))
    return (b, c, h, w), (b, g, k * k, ho, wo), (k, s, p, d)


def dconv_shapes(case):
    b, cin, cout, h, w, (kh, kw), s, p, d, g = case
    return (b, cin, h, w), (b, cout, cin // g, kh, kw), (s, p, d, g)


def outlook_shapes(case):
    b, c, heads, h, w, k, p, s = case
    gh = (h + 2 * p - k) // s + 1
    gw = (w + 2 * p - k) // s + 1
    return (b, c, h, w), (b, heads, gh * gw, k * k, k * k), (k, p, s)


# ------------------------------------------------------------------------------------------ output shapes
@pytest.mark.parametrize("case", INVOLUTION_CASES)
def test_involution_output_shape_matches_fake_kernel(case):
    xs, ws, attrs = involution_shapes(case)
    expected = fake_shape(OPS.involution2d, xs, ws, args=attrs)
    assert evaluate(inv_trt.output_shape(sym_shape(xs), sym_shape(ws), *attrs)) == expected
    assert inv_trt.output_shape(xs, ws, *attrs) == expected


@pytest.mark.parametrize("case", DCONV_CASES)
def test_dynamic_conv_output_shape_matches_fake_kernel(case):
    xs, ws, (s, p, d, g) = dconv_shapes(case)
    expected = fake_shape(OPS.dynamic_conv2d, xs, ws, args=(list(s), list(p), list(d), g))
    as_arrays = [np.asarray(v, dtype=np.int32) for v in (s, p, d)]  # how tensorrt.plugin passes int lists
    assert evaluate(dconv_trt.output_shape(sym_shape(xs), sym_shape(ws), *as_arrays, g)) == expected
    assert dconv_trt.output_shape(xs, ws, s, p, d, g) == expected


@pytest.mark.parametrize("case", OUTLOOK_CASES)
def test_outlook_output_shape_matches_fake_kernel(case):
    vs, attn_s, attrs = outlook_shapes(case)
    expected = fake_shape(OPS.outlook_aggregate, vs, attn_s, args=attrs)
    assert evaluate(outlook_trt.output_shape(sym_shape(vs), sym_shape(attn_s), *attrs)) == expected


def test_shape_logic_never_needs_reflected_operators():
    # The double rejects `int op expr` and truth tests, as the real ShapeExpr does.
    with pytest.raises(TypeError):
        _ = 2 * Sym(3)
    with pytest.raises(TypeError):
        bool(Sym(3))
    # a negative constant is written as a subtraction; kernel sizes may be expressions (dynamic_conv)
    assert trt_plugins.add(Sym(5), -7).value == -2
    assert trt_plugins.conv_out(Sym(9), Sym(3), 2, 1, 2).value == inv_op.out_size(9, 3, 2, 1, 2)
    assert trt_plugins.cdiv(Sym(17), 8).value == 3


@pytest.mark.parametrize(
    ("module", "attrs"),
    [
        (inv_trt, (0, 1, 0, 1)),
        (inv_trt, (3, 1, -1, 1)),
        (outlook_trt, (3, 1, 0)),
        (dconv_trt, ([1], [0, 0], [1, 1], 1)),
        (dconv_trt, ([1, 1], [0, 0], [1, 1], 0)),
    ],
)
def test_bad_attributes_are_rejected_with_the_plugin_name(module, attrs):
    with pytest.raises(ValueError, match=module.PLUGIN_NAME):
        module.check_attributes(*attrs)


def test_attribute_order_matches_the_plugin_nodes():
    """The AOT implementation receives the attributes positionally, in the node's order."""
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
def test_involution_launch_plan_is_the_triton_launchers(monkeypatch, case):
    pytest.importorskip("triton")
    xs, ws, attrs = involution_shapes(case)
    x, w = torch.zeros(xs), torch.zeros(ws)
    grid, args, kwargs = _record_launch(
        monkeypatch,
        "attn_export.plugins.involution.triton_kernel",
        "_involution2d_fwd",
        lambda m: m.involution2d_triton(x, w, *attrs),
    )
    block_c, block_p = inv_trt.blocks(xs[1] // ws[1], ws[3] * ws[4])
    plan_grid, scalars, constexprs = inv_trt.launch_plan(xs, ws, *attrs, block_c, block_p)
    assert grid == (plan_grid,)
    assert tuple(args[3:]) == scalars and len(scalars) == inv_trt.N_SCALARS
    assert {k: v for k, v in kwargs.items() if k != "num_warps"} == constexprs
    assert kwargs["num_warps"] == trt_plugins.NUM_WARPS
    # the same plan from shape expressions (the AOT path) evaluates to the same numbers
    sym_grid, sym_scalars, _ = inv_trt.launch_plan(sym_shape(xs), sym_shape(ws), *attrs, block_c, block_p)
    assert (sym_grid.value, evaluate(sym_scalars)) == (plan_grid, scalars)


@pytest.mark.parametrize("case", DCONV_CASES)
def test_dynamic_conv_launch_plan_is_the_triton_launchers(monkeypatch, case):
    pytest.importorskip("triton")
    xs, ws, (s, p, d, g) = dconv_shapes(case)
    x, w = torch.zeros(xs), torch.zeros(ws)
    grid, args, kwargs = _record_launch(
        monkeypatch,
        "attn_export.plugins.dynamic_conv.triton_kernel",
        "_dynamic_conv2d_fwd",
        lambda m: m.dynamic_conv2d_triton_fixed(x, w, s, p, d, g),
    )
    ho, wo = dconv_trt.output_shape(xs, ws, s, p, d, g)[2:]
    blocks = dconv_trt.blocks(ws[1] // g, ws[2], ho * wo)
    plan = dconv_trt.launch_plan(xs, ws, s, p, d, g, ws[3:], *blocks, dconv_trt.dot_precision("fp32"))
    plan_grid, scalars, constexprs = plan
    assert grid == (plan_grid,)
    assert tuple(args[3:]) == scalars and len(scalars) == dconv_trt.N_SCALARS
    assert {k: v for k, v in kwargs.items() if k != "num_warps"} == constexprs
    sym = dconv_trt.launch_plan(sym_shape(xs), sym_shape(ws), s, p, d, g, ws[3:], *blocks, "ieee")
    assert (sym[0].value, evaluate(sym[1])) == (plan_grid, scalars)


@pytest.mark.parametrize("case", OUTLOOK_CASES)
def test_outlook_launch_plan_is_the_triton_launchers(monkeypatch, case):
    pytest.importorskip("triton")
    vs, attn_s, attrs = outlook_shapes(case)
    v, a = torch.zeros(vs), torch.zeros(attn_s)
    grid, args, kwargs = _record_launch(
        monkeypatch,
        "attn_export.plugins.outlook.triton_kernel",
        "_outlook_aggregate_fwd",
        lambda m: m.outlook_aggregate_triton(v, a, *attrs),
    )
    block_c, block_p = outlook_trt.blocks(vs[1] // attn_s[1], vs[2] * vs[3])
    plan_grid, scalars, constexprs = outlook_trt.launch_plan(vs, attn_s, *attrs, block_c, block_p)
    assert grid == (plan_grid,)
    assert tuple(args[3:]) == scalars and len(scalars) == outlook_trt.N_SCALARS
    assert {k: v for k, v in kwargs.items() if k != "num_warps"} == constexprs
    sym = outlook_trt.launch_plan(sym_shape(vs), sym_shape(attn_s), *attrs, block_c, block_p)
    assert (sym[0].value, evaluate(sym[1])) == (plan_grid, scalars)


def test_dynamic_sizes_take_the_largest_blocks():
    assert inv_trt.blocks(None, None) == (32, 128)
    assert dconv_trt.blocks(None, None, None) == (64, 32, 64)
    assert outlook_trt.blocks(None, None) == (32, 64)


# ------------------------------------------------------------------------------------------ kernels, run
def _kernel_device() -> str | None:
    triton = pytest.importorskip("triton")
    from attn_export.plugins.involution.triton_kernel import _involution2d_fwd

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
    block_c, block_p = inv_trt.blocks(xs[1] // ws[1], ws[3] * ws[4])
    grid, scalars, constexprs = inv_trt.launch_plan(xs, ws, *attrs, block_c, block_p)
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
    blocks = dconv_trt.blocks(ws[1] // g, ws[2], ho * wo)
    grid, scalars, constexprs = dconv_trt.launch_plan(xs, ws, s, p, d, g, ws[3:], *blocks, "ieee")
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
    block_c, block_p = outlook_trt.blocks(vs[1] // attn_s[1], vs[2] * vs[3])
    grid, scalars, constexprs = outlook_trt.launch_plan(vs, attn_s, *attrs, block_c, block_p)
    out2 = torch.full(expected.shape, float("nan"), device=device)
    outlook_trt.aot_entry()[(grid,)](v, a, *scalars, out2, **constexprs, num_warps=trt_plugins.NUM_WARPS)
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
    from attn_export.plugins import trt
    from attn_export.plugins.dynamic_conv import trt_plugin as dconv
    from attn_export.plugins.involution import trt_plugin as inv
    from attn_export.plugins.outlook import trt_plugin as outl

    target = GPUTarget("cuda", 80, 32)
    kernels = {}
    for dtype in ("fp32", "fp16"):
        kernels["involution2d", dtype] = inv.aot_kernel(dtype, 3, 2, 1, 1, 32, 128, target=target)
        kernels["dynamic_conv2d", dtype] = dconv.aot_kernel(
            dtype, (2, 1), (1, 0), (1, 2), (3, 2), 16, 16, 64, target=target
        )
        kernels["outlook_aggregate", dtype] = outl.aot_kernel(dtype, 3, 1, 2, 32, 64, target=target)
    out = {}
    for (op, dtype), k in kernels.items():
        ptx = k.ptx.decode()
        out[f"{op}/{dtype}"] = {
            "name": k.name, "block_x": k.block_x, "shared": k.shared_mem, "params": trt.ptx_params(ptx),
            "expected": k.params, "entry": f".entry {k.name}(" in ptx,
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_aot_kernels_compile_with_exactly_the_parameters_tensorrt_passes():
    """Compiles PTX for sm_80 (Triton's own toolchain; no GPU needed), in a process without the interpreter."""
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
    }
    for key, info in result.items():
        op = key.split("/")[0]
        assert info["entry"], key
        assert info["name"] == f"{op}_aot", key
        assert info["block_x"] == 32 * trt_plugins.NUM_WARPS, key
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
        trt_plugins._ptx_version_option()
    monkeypatch.setenv(trt_plugins.PTX_VERSION_ENV, "84")
    assert trt_plugins._ptx_version_option() == 84


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
        import attn_export.serve.trt_runner
        print(sorted(m for m in ("tensorrt", "triton") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(trt_plugins, "_mode", None)


def test_register_raises_a_clear_error_without_tensorrt(monkeypatch, fresh_registry):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails as if not installed
    with pytest.raises(trt_plugins.TensorRTError, match=r"TensorRT is not installed.*pip install tensorrt"):
        trt_plugins.register_trt_plugins()
    assert not trt_plugins.tensorrt_available()
    assert trt_plugins.tensorrt_version() is None
    assert trt_plugins.plugin_mode() is None


def test_register_raises_a_clear_error_for_an_old_tensorrt(monkeypatch, fresh_registry):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0.26"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(trt_plugins.TensorRTError, match=r"10\.3\.0\.26 is too old.*>= 10\.6"):
        trt_plugins.register_trt_plugins()
    assert not trt_plugins.tensorrt_available()


def test_register_refuses_aot_before_10_9(monkeypatch, fresh_registry):
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


@pytest.mark.trt
@pytest.mark.parametrize("mode", ["jit", "aot"])
@pytest.mark.parametrize(("kind", "case"), PLUGIN_CASES)
def test_plugin_engine_matches_reference(tmp_path, mode, kind, case):
    """One plugin layer in a network built with the TensorRT API, run by TensorRTRunner, against the op."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from attn_export.serve.trt_runner import TensorRTRunner

    registered = trt_plugins.register_trt_plugins()
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
    a = network.add_input("a", trt.float32, sa)
    b = network.add_input("b", trt.float32, sb)
    op = getattr(getattr(trtp.op, NAMESPACE), module.PLUGIN_NAME)
    layer = network.add_plugin(op(a, b, **attrs))
    layer.get_output(0).name = "y"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None
    engine_path = tmp_path / f"{kind}.engine"
    engine_path.write_bytes(bytes(serialized))

    runner = TensorRTRunner(engine_path)
    gen = torch.Generator().manual_seed(5)
    xa = torch.randn(sa, generator=gen, dtype=torch.float64)
    xb = torch.randn(sb, generator=gen, dtype=torch.float64)
    got = runner.infer({"a": xa.float().numpy(), "b": xb.float().numpy()})["y"]
    np.testing.assert_allclose(got, reference(xa, xb).numpy(), atol=1e-4, rtol=1e-4)
