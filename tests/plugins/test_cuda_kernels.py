"""The Triton forward kernels of the dynamic-kernel ops against float64 references.

Two independent references: a float64 run of each op's plain-torch ``reference`` (many cases), and
naive float64 loops over pixels and taps written from the ops' definitions (small cases). Inputs are
fresh random numbers per case (never zeros), sizes are odd, strides 1 to 3, some inputs non-contiguous.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before anything imports Triton). Wherever CUDA is visible (and the interpreter is
off) the very same cases run COMPILED on the GPU, and every test here then carries the ``gpu`` marker,
so ``pytest -m gpu tests/plugins/test_cuda_kernels.py`` is the GPU run (``scripts/gpu_check.sh``).
The interpreter is weaker than a GPU: the outlook kernel once passed here and failed compiled.
"""

# ruff: noqa: E402  (the environment must be set before triton is imported)
from __future__ import annotations

import os

import torch  # importing torch does not import triton

# Triton picks interpreting vs compiling when ``@triton.jit`` runs, i.e. when a kernel module is imported,
# so without a GPU the interpreter has to be switched on before triton or any kernel module is imported.
# (Not forced on a CUDA machine: there the kernels are compiled and the gpu test runs.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton")

import torch.nn.functional as F

from attn_export.plugins._taps import out_size
from attn_export.plugins.dynamic_conv import cuda_kernel as dconv_tk
from attn_export.plugins.dynamic_conv import op as dconv_op
from attn_export.plugins.dynamic_conv.cuda_kernel import (
    _dynamic_conv2d_fwd,
    dynamic_conv2d_cuda,
    dynamic_conv2d_cuda_fixed,
)
from attn_export.plugins.involution import op as inv_op
from attn_export.plugins.involution.cuda_kernel import (
    involution2d_cuda,
    involution2d_cuda_rows,
    involution2d_cuda_tiles,
)
from attn_export.plugins.outlook import op as outlook_op
from attn_export.plugins.outlook.cuda_kernel import outlook_aggregate_cuda

INTERPRET = bool(triton.knobs.runtime.interpret)
# The kernels were decorated when their module was first imported; if that happened before the
# interpreter was switched on (another module imported them earlier), they cannot run on CPU tensors.
_KERNELS_INTERPRETED = type(_dynamic_conv2d_fwd).__name__ == "InterpretedFunction"

if INTERPRET and _KERNELS_INTERPRETED:
    DEVICE = "cpu"
elif not INTERPRET and not _KERNELS_INTERPRETED and torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

needs_device = pytest.mark.skipif(
    DEVICE is None,
    reason="needs TRITON_INTERPRET=1 set before the kernel modules are imported (CPU), or CUDA with the "
    "interpreter off",
)

# Compiled on a GPU every test here is a GPU test (``-m gpu`` selects them); interpreted, none is.
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
}
HALF = [torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _check(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), expected, **TOL[dtype])


# ------------------------------------------------------------------------------- naive float64 references
# Written from the ops' definitions with loops over pixels and taps; nothing from the ops' own code.


def naive_involution(x, weight, k, s, p, d):
    b, c, h, w = x.shape
    g, ho, wo = weight.shape[1], weight.shape[3], weight.shape[4]
    xg = x.double().reshape(b, g, c // g, h, w)
    out = torch.zeros(b, g, c // g, ho, wo, dtype=torch.float64)
    for i in range(ho):
        for j in range(wo):
            for a in range(k):
                for bb in range(k):
                    r, q = i * s - p + a * d, j * s - p + bb * d
                    if 0 <= r < h and 0 <= q < w:
                        out[:, :, :, i, j] += weight[:, :, a * k + bb, i, j, None].double() * xg[:, :, :, r, q]
    return out.reshape(b, c, ho, wo)


def naive_dynamic_conv(x, weight, stride, padding, dilation, groups):
    """One ordinary float64 convolution per sample."""
    return torch.cat(
        [
            F.conv2d(x[i : i + 1].double(), weight[i].double(), None, stride, padding, dilation, groups)
            for i in range(x.shape[0])
        ]
    )


def naive_outlook(v, attn, k, p, s):
    """For every window n = (i, j), y_n = attn_n @ (its k*k patch of v), folded back tap by tap."""
    b, c, h, w = v.shape
    heads = attn.shape[1]
    gh, gw = out_size(h, k, s, p, 1), out_size(w, k, s, p, 1)
    vp = F.pad(v.double(), (p, p, p, p)).reshape(b, heads, c // heads, h + 2 * p, w + 2 * p)
    out = torch.zeros(b, heads, c // heads, h + 2 * p, w + 2 * p, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            patch = vp[:, :, :, i * s : i * s + k, j * s : j * s + k].reshape(b, heads, c // heads, k * k)
            y = torch.einsum("bmtu,bmcu->bmct", attn[:, :, i * gw + j].double(), patch)
            out[:, :, :, i * s : i * s + k, j * s : j * s + k] += y.reshape(b, heads, c // heads, k, k)
    return out[..., p : p + h, p : p + w].reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------- involution

# (B, C, G, H, W, k, stride, padding, dilation)
INVOLUTION_CASES = [
    (1, 8, 2, 7, 9, 3, 1, 1, 1),
    (3, 8, 2, 7, 9, 3, 2, 1, 1),
    (1, 4, 1, 7, 9, 1, 1, 0, 1),
    (2, 8, 2, 7, 9, 1, 2, 0, 1),
    (1, 8, 2, 9, 7, 5, 1, 2, 1),
    (3, 6, 3, 8, 9, 3, 1, 2, 2),
    (1, 8, 4, 11, 10, 7, 2, 3, 1),
    (1, 3, 1, 7, 9, 3, 2, 0, 1),
    (1, 40, 1, 13, 12, 3, 1, 1, 1),  # 40 channels per group, 156 pixels: several blocks of each
]


def _involution_inputs(seed, b, c, g, h, w, k, s, p, d):
    ho = out_size(h, k, s, p, d)
    wo = out_size(w, k, s, p, d)
    gen = _gen(seed)
    return _randn(gen, b, c, h, w), _randn(gen, b, g, k * k, ho, wo)


#: The op's kernel (the row-reuse one) and the tile kernel the TensorRT plugin compiles ahead of time.
INVOLUTION_KERNELS = {"op": involution2d_cuda, "tiles": involution2d_cuda_tiles}


@needs_device
@pytest.mark.parametrize("kernel", INVOLUTION_KERNELS)
@pytest.mark.parametrize("case", INVOLUTION_CASES, ids=lambda c: "B{}C{}G{}_{}x{}_k{}s{}p{}d{}".format(*c))
def test_involution2d_fp32(case, kernel):
    k, s, p, d = case[5:]
    x, weight = _involution_inputs(1, *case)
    expected = inv_op.reference(x, weight, k, s, p, d)
    out = INVOLUTION_KERNELS[kernel](x.float().to(DEVICE), weight.float().to(DEVICE), k, s, p, d)
    _check(out, expected, torch.float32)


@needs_device
@pytest.mark.parametrize("kernel", INVOLUTION_KERNELS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", [(2, 8, 2, 7, 9, 3, 1, 1, 1), (1, 6, 3, 9, 7, 3, 2, 1, 1)], ids=["s1", "s2"])
def test_involution2d_half(case, dtype, kernel):
    k, s, p, d = case[5:]
    x, weight = _involution_inputs(2, *case)
    x, weight = x.to(dtype), weight.to(dtype)  # the reference sees the same rounded inputs
    expected = inv_op.reference(x.double(), weight.double(), k, s, p, d)
    _check(INVOLUTION_KERNELS[kernel](x.to(DEVICE), weight.to(DEVICE), k, s, p, d), expected, dtype)


@needs_device
@pytest.mark.parametrize("case", [(2, 6, 2, 7, 9, 3, 2, 1, 1), (1, 4, 1, 6, 5, 3, 1, 2, 2)], ids=["s2", "dil2"])
def test_involution2d_matches_naive_loops(case):
    k, s, p, d = case[5:]
    x, weight = _involution_inputs(13, *case)
    out = involution2d_cuda(x.float().to(DEVICE), weight.float().to(DEVICE), k, s, p, d)
    _check(out, naive_involution(x, weight, k, s, p, d), torch.float32)


@needs_device
def test_involution2d_non_contiguous():
    x, weight = _involution_inputs(3, 2, 8, 2, 9, 7, 3, 2, 1, 1)
    expected = inv_op.reference(x, weight, 3, 2, 1, 1)
    x_cl = x.float().to(DEVICE).to(memory_format=torch.channels_last)
    w_t = weight.float().to(DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(involution2d_cuda(x_cl, w_t, 3, 2, 1, 1), expected, torch.float32)


@needs_device
@pytest.mark.parametrize(
    "case", [*INVOLUTION_CASES[::2], INVOLUTION_CASES[5]], ids=lambda c: "B{}C{}G{}_{}x{}_k{}s{}p{}d{}".format(*c)
)
def test_involution2d_rows_candidate(case):
    """The row-reuse kernel (whole rows per program, column taps gathered in registers)."""
    k, s, p, d = case[5:]
    x, weight = _involution_inputs(18, *case)
    expected = inv_op.reference(x, weight, k, s, p, d)
    out = involution2d_cuda_rows(x.float().to(DEVICE), weight.float().to(DEVICE), k, s, p, d)
    _check(out, expected, torch.float32)


@needs_device
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_involution2d_rows_candidate_half_and_non_contiguous(dtype):
    x, weight = _involution_inputs(19, 2, 8, 2, 9, 7, 3, 2, 1, 1)
    x, weight = x.to(dtype), weight.to(dtype)
    expected = inv_op.reference(x.double(), weight.double(), 3, 2, 1, 1)
    x_cl = x.to(DEVICE).to(memory_format=torch.channels_last)
    _check(involution2d_cuda_rows(x_cl, weight.to(DEVICE), 3, 2, 1, 1), expected, dtype)


def test_involution2d_rows_candidate_refuses_rows_it_cannot_hold():
    x, weight = torch.zeros(1, 2, 3, 600), torch.zeros(1, 1, 9, 3, 600)
    with pytest.raises(ValueError, match="exceed"):
        involution2d_cuda_rows(x, weight, 3, 1, 1, 1)


# -------------------------------------------------------------------------------------------- dynamic conv

# (B, Cin, Cout, groups, H, W, kH, kW, stride, padding, dilation)
DCONV_CASES = [
    (1, 4, 6, 1, 7, 9, 3, 3, (1, 1), (1, 1), (1, 1)),
    (3, 8, 8, 2, 7, 9, 3, 3, (2, 2), (1, 1), (1, 1)),
    (1, 8, 4, 4, 7, 9, 1, 1, (1, 1), (0, 0), (1, 1)),
    (3, 8, 6, 2, 7, 9, 1, 1, (2, 2), (0, 0), (1, 1)),
    (2, 6, 6, 6, 9, 7, 3, 3, (1, 1), (2, 2), (2, 2)),  # depthwise, dilated
    (1, 3, 5, 1, 8, 9, 3, 2, (2, 1), (1, 0), (1, 2)),  # every geometry argument asymmetric
    (1, 40, 20, 1, 9, 9, 3, 3, (1, 1), (1, 1), (1, 1)),  # two input-channel chunks, two pixel blocks
    (1, 4, 70, 1, 5, 5, 1, 1, (1, 1), (0, 0), (1, 1)),  # two output-channel blocks
    (1, 4, 4, 1, 7, 9, 3, 3, (1, 1), (0, 0), (1, 1)),
]


def _dconv_inputs(seed, b, cin, cout, groups, h, w, kh, kw):
    gen = _gen(seed)
    return _randn(gen, b, cin, h, w), _randn(gen, b, cout, cin // groups, kh, kw)


def _dconv_id(c):
    return "B{}Ci{}Co{}g{}_{}x{}_k{}x{}_s{}{}_p{}{}_d{}{}".format(*c[:8], *c[8], *c[9], *c[10])


@needs_device
@pytest.mark.parametrize("case", DCONV_CASES, ids=_dconv_id)
def test_dynamic_conv2d_fp32(case):
    b, cin, cout, groups, h, w, kh, kw, s, p, d = case
    x, weight = _dconv_inputs(4, b, cin, cout, groups, h, w, kh, kw)
    expected = dconv_op.reference(x, weight, s, p, d, groups)
    out = dynamic_conv2d_cuda(x.float().to(DEVICE), weight.float().to(DEVICE), s, p, d, groups)
    _check(out, expected, torch.float32)


@needs_device
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_dynamic_conv2d_half(dtype):
    x, weight = _dconv_inputs(5, 2, 8, 8, 2, 7, 9, 3, 3)
    x, weight = x.to(dtype), weight.to(dtype)
    expected = dconv_op.reference(x.double(), weight.double(), (2, 1), (1, 1), (1, 1), 2)
    out = dynamic_conv2d_cuda(x.to(DEVICE), weight.to(DEVICE), (2, 1), (1, 1), (1, 1), 2)
    _check(out, expected, dtype)


@needs_device
@pytest.mark.parametrize("case", DCONV_CASES[1:6:2], ids=_dconv_id)
def test_dynamic_conv2d_matches_per_sample_convolutions(case):
    b, cin, cout, groups, h, w, kh, kw, s, p, d = case
    x, weight = _dconv_inputs(14, b, cin, cout, groups, h, w, kh, kw)
    out = dynamic_conv2d_cuda(x.float().to(DEVICE), weight.float().to(DEVICE), s, p, d, groups)
    _check(out, naive_dynamic_conv(x, weight, s, p, d, groups), torch.float32)


#: Cases with a group's input channels a multiple of 32: the channels-last implicit GEMM's.
DCONV_CL_CASES = [
    (2, 32, 20, 1, 7, 9, 3, 3, (1, 1), (1, 1), (1, 1)),
    (1, 64, 8, 2, 9, 7, 3, 3, (2, 1), (1, 2), (1, 2)),
    (3, 32, 17, 1, 5, 6, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 96, 15, 3, 11, 5, 3, 2, (2, 1), (2, 1), (2, 1)),  # 3 groups, odd sizes, stride (2, 1), dilation
]


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("case", DCONV_CL_CASES, ids=["k3", "g2_s21_d12", "k1", "g3_s21_d21_k3x2"])
def test_dynamic_conv2d_channels_last(case, dtype):
    """Channels of a group in multiples of 32 take the channels-last implicit GEMM, in every dtype (fp32 with
    IEEE products: torch's TF32 switch is off by default)."""
    assert dconv_tk.channels_last(case[1] // case[3])
    s, p, d, groups = case[8], case[9], case[10], case[3]
    x, weight = _dconv_inputs(21 + case[1], *case[:8])
    x, weight = x.to(dtype), weight.to(dtype)
    expected = naive_dynamic_conv(x.double(), weight.double(), s, p, d, groups)
    _check(dynamic_conv2d_cuda(x.to(DEVICE), weight.to(DEVICE), s, p, d, groups), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cin", "groups", "expected"), [(64, 2, "cl"), (32, 1, "cl"), (40, 1, "nchw"), (8, 4, "nchw")])
def test_dynamic_conv2d_picks_channels_last_by_the_channels_of_a_group(monkeypatch, dtype, cin, groups, expected):
    """The channels-last kernel runs where a group's channels are a multiple of 32, whatever the dtype, and is
    given channels-last operands: x (B, H, W, Cin), the weight (B, Cout, kH, kW, Cin/groups)."""
    calls = []

    def recorder(name):
        class Recorder:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append((name, args[0].shape, args[1].shape))

        return lambda: Recorder()

    monkeypatch.setattr(dconv_tk, "_igemm", recorder("nchw"))
    monkeypatch.setattr(dconv_tk, "_igemm_cl", recorder("cl"))
    x, weight = torch.randn(2, cin, 5, 7).to(dtype), torch.randn(2, 6, cin // groups, 3, 1).to(dtype)
    dynamic_conv2d_cuda(x, weight, (1, 1), (1, 0), (1, 1), groups)
    if expected == "cl":
        assert calls == [("cl", (2, 5, 7, cin), (2, 6, 3, 1, cin // groups))]
    else:
        assert calls == [("nchw", tuple(x.shape), tuple(weight.shape))]


@needs_device
def test_dynamic_conv2d_tf32():
    """TF32 products (10-bit mantissa inputs, fp32 accumulation): close to fp32 at TF32's tolerance."""
    x, weight = _dconv_inputs(15, 2, 16, 8, 1, 7, 9, 3, 3)
    expected = dconv_op.reference(x, weight, (1, 1), (1, 1), (1, 1), 1)
    out = dynamic_conv2d_cuda(
        x.float().to(DEVICE), weight.float().to(DEVICE), (1, 1), (1, 1), (1, 1), 1, allow_tf32=True
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("dtype", "flag", "arg", "expected"),
    [
        (torch.float32, False, None, "ieee"),
        (torch.float32, True, None, "tf32"),
        (torch.float32, True, False, "ieee"),
        (torch.float32, False, True, "tf32"),
        (torch.float16, True, None, None),
    ],
)
def test_dynamic_conv2d_precision_follows_torch_unless_told(monkeypatch, dtype, flag, arg, expected):
    """fp32: TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it, unless the call says."""
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(kwargs)

    monkeypatch.setattr(dconv_tk, "_igemm", lambda: Recorder())
    monkeypatch.setattr(dconv_tk, "tf32_allowed", lambda: flag)
    x, weight = torch.randn(1, 4, 5, 5).to(dtype), torch.randn(1, 4, 4, 3, 3).to(dtype)
    dynamic_conv2d_cuda(x, weight, (1, 1), (1, 1), (1, 1), 1, allow_tf32=arg)
    assert [c["DOT_PRECISION"] for c in calls] == [expected]


def test_igemm_autotune_prunes_tiles_far_larger_than_the_problem():
    def cfg(m, n):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 32})

    configs = [cfg(128, 128), cfg(128, 64), cfg(64, 32), cfg(32, 16)]
    big = dconv_tk._prune(configs, {"COUT_G": 256, "HO": 28, "WO": 28})
    assert big == configs
    small = dconv_tk._prune(configs, {"COUT_G": 6, "HO": 5, "WO": 5})  # 6 channels per group, 25 pixels
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in small] == [(32, 16)]
    assert dconv_tk._prune(configs[:2], {"COUT_G": 1, "HO": 1, "WO": 1}) == configs[1:2]  # never empty
    if INTERPRET:  # one small tile in the interpreter, so CI stays fast
        assert len(dconv_tk._igemm_configs()) == 1


def test_tf32_allowed_reads_torchs_switch():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        for flag in (True, False):
            matmul.allow_tf32 = flag
            assert dconv_tk.tf32_allowed() is flag
    finally:
        matmul.allow_tf32 = before


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", DCONV_CASES, ids=_dconv_id)
def test_dynamic_conv2d_fixed_tile_kernel(case, dtype):
    """The TensorRT plugin's kernel (its own launch plan), fp32 and fp16 as the plugin declares; every case:
    strides, dilation, groups, depthwise, a reduction of several K tiles (40 channels x 9 taps)."""
    b, cin, cout, groups, h, w, kh, kw, s, p, d = case
    x, weight = _dconv_inputs(16, b, cin, cout, groups, h, w, kh, kw)
    x, weight = x.to(dtype), weight.to(dtype)
    expected = dconv_op.reference(x.double(), weight.double(), s, p, d, groups)
    _check(dynamic_conv2d_cuda_fixed(x.to(DEVICE), weight.to(DEVICE), s, p, d, groups), expected, dtype)


@needs_device
def test_dynamic_conv2d_non_contiguous():
    x, weight = _dconv_inputs(6, 2, 8, 6, 2, 9, 7, 3, 3)
    expected = dconv_op.reference(x, weight, (2, 1), (1, 1), (1, 1), 2)
    x_cl = x.float().to(DEVICE).to(memory_format=torch.channels_last)
    w_t = weight.float().to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    _check(dynamic_conv2d_cuda(x_cl, w_t, [2, 1], [1, 1], [1, 1], 2), expected, torch.float32)


# ------------------------------------------------------------------------------------------------ outlook

# (B, C, heads, H, W, k, padding, stride)
OUTLOOK_CASES = [
    (1, 8, 1, 7, 9, 3, 1, 1),
    (3, 8, 2, 7, 9, 3, 1, 2),
    (1, 4, 2, 7, 9, 1, 0, 1),
    (2, 6, 2, 7, 9, 1, 0, 2),
    (2, 6, 2, 9, 7, 3, 0, 2),
    (1, 8, 2, 8, 8, 3, 1, 2),  # VOLO's geometry
    (1, 4, 1, 7, 9, 5, 2, 3),
    (1, 64, 1, 9, 9, 3, 1, 1),  # 64 channels per head, 81 pixels: several blocks of each
    (1, 8, 2, 9, 9, 3, 1, 2),  # 4 phase blocks on a grid of 2: the grid-stride walk
    (1, 2, 1, 8, 7, 5, 2, 2),  # k=5 at stride 2 (k=7: the index-math replay, and it compiles)
    # the window-row kernel (k <= 3): three column blocks and a last partial block of rows; odd stride 2;
    # k=2 (an even window)
    (1, 4, 1, 11, 61, 3, 1, 1),
    (2, 4, 2, 13, 37, 3, 1, 2),
    (1, 4, 1, 6, 5, 2, 1, 1),
]


def _outlook_inputs(seed, b, c, heads, h, w, k, p, s):
    gh = out_size(h, k, s, p, 1)
    gw = out_size(w, k, s, p, 1)
    gen = _gen(seed)
    return _randn(gen, b, c, h, w), _randn(gen, b, heads, gh * gw, k * k, k * k)


@needs_device
@pytest.mark.parametrize("case", OUTLOOK_CASES, ids=lambda c: "B{}C{}m{}_{}x{}_k{}p{}s{}".format(*c))
def test_outlook_aggregate_fp32(case):
    k, p, s = case[5:]
    v, attn = _outlook_inputs(7, *case)
    expected = outlook_op.reference(v, attn, k, p, s)
    out = outlook_aggregate_cuda(v.float().to(DEVICE), attn.float().to(DEVICE), k, p, s)
    _check(out, expected, torch.float32)


@needs_device
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_outlook_aggregate_half(stride, dtype):
    v, attn = _outlook_inputs(8, 2, 8, 2, 7, 9, 3, 1, stride)
    v, attn = v.to(dtype), attn.softmax(-1).to(dtype)  # softmaxed, as in VOLO
    expected = outlook_op.reference(v.double(), attn.double(), 3, 1, stride)
    _check(outlook_aggregate_cuda(v.to(DEVICE), attn.to(DEVICE), 3, 1, stride), expected, dtype)


@needs_device
@pytest.mark.parametrize("case", [(2, 4, 2, 7, 9, 3, 1, 2), (1, 3, 1, 8, 7, 3, 2, 3)], ids=["k3p1s2", "k3p2s3"])
def test_outlook_aggregate_matches_naive_loops(case):
    k, p, s = case[5:]
    v, attn = _outlook_inputs(17, *case)
    out = outlook_aggregate_cuda(v.float().to(DEVICE), attn.float().to(DEVICE), k, p, s)
    _check(out, naive_outlook(v, attn, k, p, s), torch.float32)


@needs_device
def test_outlook_aggregate_non_contiguous():
    v, attn = _outlook_inputs(9, 2, 8, 2, 7, 9, 3, 1, 2)
    expected = outlook_op.reference(v, attn, 3, 1, 2)
    v_cl = v.float().to(DEVICE).to(memory_format=torch.channels_last)
    a_t = attn.float().to(DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(outlook_aggregate_cuda(v_cl, a_t, 3, 1, 2), expected, torch.float32)


# ---------------------------------------------------------------------------------- public ops on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET is on: the CUDA kernels must be compiled, not interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_public_ops_on_cuda(dtype, monkeypatch):
    import attn_export.plugins as plugins

    # fp32 is compared with IEEE products: dynamic_conv2d's CUDA kernel is cuDNN, whose default TF32 puts most
    # elements beyond fp32's tolerance (the op follows torch's TF32 switches; see its docstring)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    def run(fn, ref, *tensors_and_args, n):
        tensors, args = tensors_and_args[:n], tensors_and_args[n:]
        cast = [t.to(dtype) for t in tensors]
        expected = ref(*(t.double() for t in cast), *args)
        out = fn(*(t.cuda() for t in cast), *args)
        assert out.is_cuda
        _check(out, expected, dtype)

    x, weight = _involution_inputs(10, 3, 8, 2, 7, 9, 3, 2, 1, 1)
    run(plugins.involution2d, inv_op.reference, x, weight, 3, 2, 1, 1, n=2)
    x, weight = _dconv_inputs(11, 3, 8, 6, 2, 7, 9, 3, 3)
    run(plugins.dynamic_conv2d, dconv_op.reference, x, weight, [2, 1], [1, 1], [1, 2], 2, n=2)
    v, attn = _outlook_inputs(12, 3, 8, 2, 7, 9, 3, 1, 2)
    run(plugins.outlook_aggregate, outlook_op.reference, v, attn.softmax(-1), 3, 1, 2, n=2)
