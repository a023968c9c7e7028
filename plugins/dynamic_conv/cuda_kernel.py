"""Triton forward kernels for ``attn_export::dynamic_conv2d``.

They compute a per-sample grouped convolution, ``out[b] = conv2d(x[b], weight[b], stride, padding,
dilation, groups)`` with x (B, Cin, H, W) and weight (B, Cout, Cin/groups, kH, kW), as an implicit GEMM
on tensor cores (``tl.dot``, fp32 accumulator): for each sample and group, with M = output pixels,
N = output channels and K = input channels x taps::

    out[co, p] = sum_k Wt[co, k] * X[k, p],   X[(ci, r, s), p] = x[ci, oh*sh + r*dh - ph, ow*sw + s*dw - pw]

(zero outside the image; X is never materialised: each K step gathers its tile straight from x). Every
global load and store runs a warp's lanes along the contiguous axis of its tensor (``attn-export kernels
--accesses``).

- :func:`dynamic_conv2d_cuda`: the kernel to run, ``@triton.autotune`` over a handful of tile shapes keyed
  on the problem's shape and dtype. Where a group's input channels are a multiple of
  :data:`CL_CHANNELS_MULTIPLE` (any dtype) it runs ``_dynamic_conv2d_igemm_cl`` on channels-last operands
  (x and the weight transposed by torch first): a K tile is one tap and ``BLOCK_K`` consecutive channels,
  contiguous in both, so the compiler copies x with 16-byte ``cp.async``. Otherwise
  ``_dynamic_conv2d_igemm`` on NCHW (:func:`_nchw_tile`: pixels innermost, lanes along a row of the
  image; K walks ``k = ci*kH*kW + tap``, the weight's own order). fp32 inputs use IEEE fp32 products by
  default; TF32 tensor-core products when torch allows them (``torch.backends.cuda.matmul.allow_tf32``)
  or when asked (``allow_tf32=True``). fp16 and bf16 load as they are. Under ``TRITON_INTERPRET=1`` one
  small tile shape is tried, so the CPU tests stay fast.
- ``_dynamic_conv2d_fwd`` with :func:`dynamic_conv2d_cuda_fixed`: the fixed-tile kernel of the
  TensorRT plugin (``plugins/dynamic_conv/trt_plugin.py`` compiles it ahead of time; both launch it
  with the plan of ``plan.py``, and its parameters are that plugin's contract): the NCHW tile of
  :func:`_nchw_tile` with the plan's small blocks. fp32 uses IEEE products there (``DOT_PRECISION="ieee"``).

The op's own CUDA kernel (``op.py``) does not use either: there the batch-folded cuDNN convolution is
the fastest correct path (on an H200, B32 C256 28x28 k3: 0.27 ms against 4.2 ms for a Triton
kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attn_export.plugins._cuda_common import NUM_WARPS, contiguous_pair, program_tile
from attn_export.plugins.dynamic_conv.op import Ints
from attn_export.plugins.dynamic_conv.plan import blocks, check_attributes, launch_plan, output_shape


@triton.jit
def _nchw_tile(
    x_ptr,
    w_ptr,
    out_ptr,
    CIN,
    H,
    W,
    COUT,
    HO,
    WO,
    CIN_G,
    COUT_G,
    b,
    g,
    tile_n,
    tile_m,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One output tile of the implicit GEMM on NCHW operands, pixels innermost:
    ``out[co, p] = sum_k Wt[co, k] X[k, p]`` with ``k = ci*KH*KW + r*KW + s`` (the weight's own order).
    The x tile is ``[BLOCK_K, BLOCK_M]`` (pixels last: a warp's lanes run along a row of the image), the
    weight tile ``[BLOCK_N, BLOCK_K]`` (K last: contiguous in the weight), the output tile
    ``[BLOCK_N, BLOCK_M]`` (pixels last: contiguous in the output)."""
    KHW: tl.constexpr = KH * KW
    hw = H * W
    howo = HO * WO
    ktot = CIN_G * KHW
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < howo
    n_mask = n < COUT_G
    ih0 = (m // WO) * SH - PH  # m >= 0: these are exact
    iw0 = (m % WO) * SW - PW

    x_base = x_ptr + (b * CIN + g * CIN_G) * hw
    w_base = w_ptr + (b * COUT + g * COUT_G) * ktot
    o_base = out_ptr + (b * COUT + g * COUT_G) * howo
    w_rows = n.to(tl.int64)[:, None] * ktot

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, ktot, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < ktot
        ci = k // KHW
        tap = k % KHW
        ih = ih0[None, :] + ((tap // KW) * DH)[:, None]
        iw = iw0[None, :] + ((tap % KW) * DW)[:, None]
        x_ok = k_mask[:, None] & m_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_base + ci.to(tl.int64)[:, None] * hw + (ih * W + iw), mask=x_ok, other=0.0)
        wt = tl.load(w_base + w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16 (stored as uint16 there): take fp32 products
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(wt, xt, acc, input_precision=DOT_PRECISION)

    dst = o_base + n.to(tl.int64)[:, None] * howo + m[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _dynamic_conv2d_fwd(
    x_ptr,
    w_ptr,
    out_ptr,
    CIN,
    H,
    W,
    COUT,
    HO,
    WO,
    GROUPS,
    CIN_G,
    COUT_G,
    n_pblk,
    n_coblk,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The fixed-tile kernel (the TensorRT plugin's): one ``[BLOCK_CO, BLOCK_P]`` output tile per program,
    the reduction in ``BLOCK_K`` steps of (input channel, tap)."""
    co_blk, p_blk, _, b, g = program_tile(n_coblk, n_pblk, GROUPS)
    _nchw_tile(x_ptr, w_ptr, out_ptr, CIN, H, W, COUT, HO, WO, CIN_G, COUT_G, b, g, co_blk, p_blk,
               SH, SW, PH, PW, DH, DW, KH, KW, BLOCK_CO, BLOCK_P, BLOCK_K, DOT_PRECISION, False)  # fmt: skip


def _prepare(name: str, x: Tensor, weight: Tensor, stride: Ints, padding: Ints, dilation: Ints):
    """``(x, weight, out, ready)``: the inputs made contiguous and the output allocated; ``ready`` is False
    where ``out`` is already the result (an empty output, or zeros for an empty reduction)."""
    x, weight = contiguous_pair(name, ("x", "weight"), x, weight)
    ho, wo = output_shape(x.shape, weight.shape, stride, padding, dilation, 1)[2:]
    out = torch.empty((x.shape[0], weight.shape[1], ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return x, weight, out, False
    if weight.shape[2] == 0:  # an empty reduction
        return x, weight, out.zero_(), False
    return x, weight, out, True


def dynamic_conv2d_cuda_fixed(
    x: Tensor, weight: Tensor, stride: Ints, padding: Ints, dilation: Ints, groups: int
) -> Tensor:
    """Per-sample convolution with the TensorRT plugin's fixed-tile kernel (its launch plan); as ``op.reference``."""
    x, weight, out, ready = _prepare("dynamic_conv2d_cuda_fixed", x, weight, stride, padding, dilation)
    if not ready:
        return out
    ho, wo = out.shape[2:]
    tiles = blocks(weight.shape[1] // groups, weight.shape[2], ho * wo)  # tl.dot needs every tile dimension >= 16
    precision = "ieee" if x.dtype == torch.float32 else None  # None: the backend default
    plan = launch_plan(x.shape, weight.shape, stride, padding, dilation, groups, weight.shape[3:], *tiles, precision)
    grid, scalars, constexprs = plan
    _dynamic_conv2d_fwd[(grid,)](x, weight, out, *scalars, **constexprs, num_warps=NUM_WARPS)
    return out


# ------------------------------------------------------------------------------ autotuned implicit GEMM
def _prune(configs, named_args, **kwargs) -> list:
    """Drop tiles far larger than the problem (a group's output channels, the output pixels)."""
    n_cap = max(16, triton.next_power_of_2(int(named_args["COUT_G"])))
    m_cap = max(32, triton.next_power_of_2(int(named_args["HO"]) * int(named_args["WO"])))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_M"] <= m_cap]
    return kept or configs[-1:]


#: The tile the kernel report (``attn-export kernels``) compiles for B32 C256 28x28 k3:
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), one of :func:`_igemm_configs`.
REPORT_CONFIG = (128, 64, 32, 4, 4)


def _igemm_configs() -> list:
    """Tile shapes tried by the autotuner (the interpreter gets one small one)."""
    if triton.knobs.runtime.interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the matmul tutorial's shapes for Hopper
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 32, 32, 4, 4),  # small groups (few output channels per group)
        (32, 16, 16, 2, 4),  # depthwise-like groups
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
        for m, n, k, w, st in shapes
    ]


@triton.jit
def _dynamic_conv2d_igemm(
    x_ptr,
    w_ptr,
    out_ptr,
    CIN,
    H,
    W,
    COUT,
    HO,
    WO,
    GROUPS,
    CIN_G,
    COUT_G,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The implicit GEMM on NCHW operands (:func:`_nchw_tile`): where a group's channels are not a multiple
    of :data:`CL_CHANNELS_MULTIPLE`."""
    n_m = tl.cdiv(HO * WO, BLOCK_M)
    n_n = tl.cdiv(COUT_G, BLOCK_N)
    # output-channel tiles fastest: neighbouring programs share one gathered input tile (L2 reuse)
    tile_n, tile_m, _, b, g = program_tile(n_n, n_m, GROUPS)
    _nchw_tile(x_ptr, w_ptr, out_ptr, CIN, H, W, COUT, HO, WO, CIN_G, COUT_G, b, g, tile_n, tile_m,
               SH, SW, PH, PW, DH, DW, KH, KW, BLOCK_N, BLOCK_M, BLOCK_K, DOT_PRECISION, UPCAST)  # fmt: skip


@triton.jit
def _dynamic_conv2d_igemm_cl(
    x_ptr,
    w_ptr,
    out_ptr,
    CIN,
    H,
    W,
    COUT,
    HO,
    WO,
    GROUPS,
    CIN_G,
    COUT_G,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The implicit GEMM on channels-last operands: x (B, H, W, Cin), weight (B, Cout, kH, kW, Cin/groups).
    K walks ``k = tap * CIN_G + ci`` with ``BLOCK_K`` dividing ``CIN_G``, so a K tile is one tap and
    ``BLOCK_K`` consecutive channels: contiguous in x and in the weight, with one mask per pixel. The
    compiler can then copy x tiles asynchronously (``cp.async``), as it does the weights."""
    howo = HO * WO
    n_m = tl.cdiv(howo, BLOCK_M)
    n_n = tl.cdiv(COUT_G, BLOCK_N)
    tile_n, tile_m, _, b, g = program_tile(n_n, n_m, GROUPS)

    KHW: tl.constexpr = KH * KW
    ktot = CIN_G * KHW
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_mask = m < howo
    n_mask = n < COUT_G
    ih0 = (m // WO) * SH - PH
    iw0 = (m % WO) * SW - PW

    x_base = x_ptr + b * H * W * CIN + g * CIN_G
    w_base = w_ptr + (b * COUT + g * COUT_G) * ktot
    o_base = out_ptr + (b * COUT + g * COUT_G) * howo
    w_cols = n.to(tl.int64)[None, :] * ktot

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, ktot, BLOCK_K):
        tap = k0 // CIN_G  # one tap per K tile (BLOCK_K divides CIN_G)
        ci0 = k0 - tap * CIN_G
        ih = ih0 + (tap // KW) * DH
        iw = iw0 + (tap % KW) * DW
        pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = (ih * W + iw).to(tl.int64) * CIN + ci0
        a = tl.load(x_base + pix[:, None] + kk[None, :], mask=pix_ok[:, None], other=0.0)
        wt = tl.load(w_base + w_cols + (k0 + kk)[:, None], mask=n_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16: fp32 products there
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)

    dst = o_base + n.to(tl.int64)[None, :] * howo + m[:, None]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


#: The channels-last GEMM runs where every tile shape's BLOCK_K divides the channels of a group.
CL_CHANNELS_MULTIPLE = 32


def channels_last(cin_g: int) -> bool:
    """Whether :func:`dynamic_conv2d_cuda` runs the channels-last kernel for ``cin_g`` input channels per
    group (any dtype): x tiles along the channels, 16-byte ``cp.async`` (``attn-export kernels``)."""
    return cin_g % CL_CHANNELS_MULTIPLE == 0


_igemm_kernel = None
_igemm_cl_kernel = None


def _igemm():
    """The autotuned kernel, built on first use (the configs depend on TRITON_INTERPRET)."""
    global _igemm_kernel
    if _igemm_kernel is None:
        _igemm_kernel = triton.autotune(
            configs=_igemm_configs(),
            key=["CIN_G", "COUT_G", "HO", "WO", "KH", "KW", "SH", "SW", "DOT_PRECISION"],
            prune_configs_by={"early_config_prune": _prune},
        )(_dynamic_conv2d_igemm)
    return _igemm_kernel


def _igemm_cl():
    """The autotuned channels-last kernel, built on first use."""
    global _igemm_cl_kernel
    if _igemm_cl_kernel is None:
        _igemm_cl_kernel = triton.autotune(
            configs=_igemm_configs(),
            key=["CIN_G", "COUT_G", "HO", "WO", "KH", "KW", "SH", "SW", "DOT_PRECISION"],
            prune_configs_by={"early_config_prune": _prune},
        )(_dynamic_conv2d_igemm_cl)
    return _igemm_cl_kernel


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32``)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dynamic_conv2d_cuda(
    x: Tensor,
    weight: Tensor,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    *,
    allow_tf32: bool | None = None,
) -> Tensor:
    """Per-sample convolution with the autotuned implicit-GEMM kernel; same arguments and result as
    ``op.reference``. ``allow_tf32`` (fp32 only): TF32 tensor-core products; None follows torch's
    ``torch.backends.cuda.matmul.allow_tf32``."""
    x, weight, out, ready = _prepare("dynamic_conv2d_cuda", x, weight, stride, padding, dilation)
    if not ready:
        return out
    b, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape[1:]
    ho, wo = out.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = check_attributes(stride, padding, dilation, groups)
    if x.dtype == torch.float32:
        tf32 = tf32_allowed() if allow_tf32 is None else bool(allow_tf32)
        precision = "tf32" if tf32 else "ieee"
    else:
        precision = None  # fp16/bf16: the backend's default (tensor cores, fp32 accumulator)
    upcast = bool(triton.knobs.runtime.interpret) and x.dtype == torch.bfloat16
    if upcast:
        precision = "ieee"
    cout_g = cout // groups

    def grid(meta):
        return (b * groups * triton.cdiv(ho * wo, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]),)

    kernel = _igemm()
    if channels_last(cin_g):
        # channels-last operands, so the x tiles are contiguous and copied asynchronously (one transposing
        # pass over x and the weight first)
        kernel = _igemm_cl()
        x = x.permute(0, 2, 3, 1).contiguous()
        weight = weight.permute(0, 1, 3, 4, 2).contiguous()
    kernel[grid](
        x,
        weight,
        out,
        cin,
        h,
        w,
        cout,
        ho,
        wo,
        groups,
        cin_g,
        cout_g,
        SH=sh,
        SW=sw,
        PH=ph,
        PW=pw,
        DH=dh,
        DW=dw,
        KH=kh,
        KW=kw,
        DOT_PRECISION=precision,
        UPCAST=upcast,
    )
    return out
