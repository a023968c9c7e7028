"""The Triton forward kernels of the dynamic-kernel ops against a float64 run of each op's ``reference``.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``); with
CUDA and the interpreter off, the same cases run compiled on the GPU, and the ``gpu``-marked test also
goes through the public custom ops' CUDA kernels.
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

from attn_export.plugins._taps import out_size
from attn_export.plugins.dynamic_conv import op as dconv_op
from attn_export.plugins.dynamic_conv.triton_kernel import _dynamic_conv2d_fwd, dynamic_conv2d_triton
from attn_export.plugins.involution import op as inv_op
from attn_export.plugins.involution.triton_kernel import involution2d_triton
from attn_export.plugins.outlook import op as outlook_op
from attn_export.plugins.outlook.triton_kernel import outlook_aggregate_triton

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

TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-2, "rtol": 1e-2}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _check(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), expected, **TOL[dtype])


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


@needs_device
@pytest.mark.parametrize("case", INVOLUTION_CASES, ids=lambda c: "B{}C{}G{}_{}x{}_k{}s{}p{}d{}".format(*c))
def test_involution2d_fp32(case):
    k, s, p, d = case[5:]
    x, weight = _involution_inputs(1, *case)
    expected = inv_op.reference(x, weight, k, s, p, d)
    out = involution2d_triton(x.float().to(DEVICE), weight.float().to(DEVICE), k, s, p, d)
    _check(out, expected, torch.float32)


@needs_device
def test_involution2d_fp16():
    case = (2, 8, 2, 7, 9, 3, 1, 1, 1)
    x, weight = _involution_inputs(2, *case)
    x, weight = x.half(), weight.half()
    expected = inv_op.reference(x.double(), weight.double(), 3, 1, 1, 1)
    _check(involution2d_triton(x.to(DEVICE), weight.to(DEVICE), 3, 1, 1, 1), expected, torch.float16)


@needs_device
def test_involution2d_non_contiguous():
    x, weight = _involution_inputs(3, 2, 8, 2, 9, 7, 3, 2, 1, 1)
    expected = inv_op.reference(x, weight, 3, 2, 1, 1)
    x_cl = x.float().to(DEVICE).to(memory_format=torch.channels_last)
    w_t = weight.float().to(DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(involution2d_triton(x_cl, w_t, 3, 2, 1, 1), expected, torch.float32)


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
    out = dynamic_conv2d_triton(x.float().to(DEVICE), weight.float().to(DEVICE), s, p, d, groups)
    _check(out, expected, torch.float32)


@needs_device
def test_dynamic_conv2d_fp16():
    x, weight = _dconv_inputs(5, 2, 8, 8, 2, 7, 9, 3, 3)
    x, weight = x.half(), weight.half()
    expected = dconv_op.reference(x.double(), weight.double(), (1, 1), (1, 1), (1, 1), 2)
    out = dynamic_conv2d_triton(x.to(DEVICE), weight.to(DEVICE), (1, 1), (1, 1), (1, 1), 2)
    _check(out, expected, torch.float16)


@needs_device
def test_dynamic_conv2d_non_contiguous():
    x, weight = _dconv_inputs(6, 2, 8, 6, 2, 9, 7, 3, 3)
    expected = dconv_op.reference(x, weight, (2, 1), (1, 1), (1, 1), 2)
    x_cl = x.float().to(DEVICE).to(memory_format=torch.channels_last)
    w_t = weight.float().to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    _check(dynamic_conv2d_triton(x_cl, w_t, [2, 1], [1, 1], [1, 1], 2), expected, torch.float32)


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
    out = outlook_aggregate_triton(v.float().to(DEVICE), attn.float().to(DEVICE), k, p, s)
    _check(out, expected, torch.float32)


@needs_device
def test_outlook_aggregate_fp16():
    v, attn = _outlook_inputs(8, 2, 8, 2, 7, 9, 3, 1, 1)
    v, attn = v.half(), attn.softmax(-1).half()  # softmaxed, as in VOLO
    expected = outlook_op.reference(v.double(), attn.double(), 3, 1, 1)
    _check(outlook_aggregate_triton(v.to(DEVICE), attn.to(DEVICE), 3, 1, 1), expected, torch.float16)


@needs_device
def test_outlook_aggregate_non_contiguous():
    v, attn = _outlook_inputs(9, 2, 8, 2, 7, 9, 3, 1, 2)
    expected = outlook_op.reference(v, attn, 3, 1, 2)
    v_cl = v.float().to(DEVICE).to(memory_format=torch.channels_last)
    a_t = attn.float().to(DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    _check(outlook_aggregate_triton(v_cl, a_t, 3, 1, 2), expected, torch.float32)


# ---------------------------------------------------------------------------------- public ops on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET is on: the CUDA kernels must be compiled, not interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_public_ops_on_cuda(dtype):
    import attn_export.plugins as plugins

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
