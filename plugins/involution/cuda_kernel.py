"""Triton forward kernel for ``attn_export::involution2d``.

Computes, for x (B, C, H, W) and a per-pixel kernel weight (B, G, k*k, Ho, Wo) shared by the
``cg = C / G`` channels of a group::

    out[b, g*cg + c, i, j] = sum_t weight[b, g, t, i, j] * x[b, g*cg + c, i*s + a*d - p, j*s + bb*d - p]

with ``t = a*k + bb`` and zeros outside the image. Work split: a 1-D grid; each program owns one
``(sample, group)``, a block of ``BLOCK_C`` channels of that group and a block of ``BLOCK_P`` flattened
output pixels, and loops over the ``k*k`` taps: per tap it loads one weight row (shared by all the
block's channels) and gathers one ``BLOCK_C x BLOCK_P`` tile of x (masked for padding and ragged
edges). Accumulates in fp32; stores in the input dtype. This is the kernel the op and the TensorRT
plugin run, with one launch plan (``plan.py``; the plugin compiles ``_involution2d_fwd`` ahead of time).

A candidate, :func:`involution2d_cuda_rows`, keeps each padded input row in registers and takes the
column taps from it with ``tl.gather`` (warp shuffles when compiled for sm_90), reading x ``k`` times
per output row instead of ``k*k``. It is timed beside the default by ``attn-export bench --device
cuda``; the op switches to it only once a GPU shows it faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn_export.plugins._cuda_common import NUM_WARPS, contiguous_pair, program_tile
from attn_export.plugins.involution.plan import blocks, launch_plan


@triton.jit
def _involution2d_fwd(
    x_ptr,
    w_ptr,
    out_ptr,
    C,
    H,
    W,
    Ho,
    Wo,
    G,
    CG,
    n_pblk,
    n_cblk,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    DIL: tl.constexpr,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    c_blk, p_blk, bg, b, g = program_tile(n_cblk, n_pblk, G)  # bg = sample * G + group

    hw = H * W
    howo = Ho * Wo
    c_offs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    p_offs = p_blk * BLOCK_P + tl.arange(0, BLOCK_P)
    c_mask = c_offs < CG
    p_mask = p_offs < howo
    oh = p_offs // Wo
    ow = p_offs % Wo

    # x and out: first channel of this (sample, group); weight: this (sample, group)'s k*k x Ho*Wo slab.
    x_base = x_ptr + (b * C + g * CG) * hw
    o_base = out_ptr + (b * C + g * CG) * howo
    w_base = w_ptr + bg * (K * K) * howo
    c_row = c_offs.to(tl.int64)[:, None]

    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for a in tl.static_range(K):
        ih = oh * STRIDE + a * DIL - PAD
        h_ok = (ih >= 0) & (ih < H)
        for bb in tl.static_range(K):
            iw = ow * STRIDE + bb * DIL - PAD
            ok = p_mask & h_ok & (iw >= 0) & (iw < W)
            wt = tl.load(w_base + (a * K + bb) * howo + p_offs, mask=p_mask, other=0.0).to(tl.float32)
            xv = tl.load(
                x_base + c_row * hw + (ih * W + iw)[None, :],
                mask=c_mask[:, None] & ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += xv * wt[None, :]

    tl.store(
        o_base + c_row * howo + p_offs[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=c_mask[:, None] & p_mask[None, :],
    )


def involution2d_cuda(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward with the Triton kernel; same arguments and result as ``op.reference``."""
    x, weight = contiguous_pair("involution2d_cuda", ("x", "weight"), x, weight)
    b, c = x.shape[:2]
    ho, wo = weight.shape[-2:]
    out = torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c, block_p = blocks(c // weight.shape[1], ho * wo)
    plan = launch_plan(x.shape, weight.shape, kernel_size, stride, padding, dilation, block_c, block_p)
    grid, scalars, constexprs = plan
    _involution2d_fwd[(grid,)](x, weight, out, *scalars, **constexprs, num_warps=NUM_WARPS)
    return out


# ------------------------------------------------------------------------------ candidate: row reuse
#: Widest padded input row the row-reuse kernel holds in registers (per channel).
ROWS_MAX_WIDTH = 512


@triton.jit
def _involution2d_rows(
    x_ptr,
    w_ptr,
    out_ptr,
    C,
    H,
    W,
    Ho,
    Wo,
    G,
    CG,
    n_hblk,
    n_cblk,
    STRIDE: tl.constexpr,
    PAD: tl.constexpr,
    DIL: tl.constexpr,
    K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_WIN: tl.constexpr,
    ROWS: tl.constexpr,
):
    """``ROWS`` whole output rows of ``BLOCK_C`` channels of one (sample, group) per program. For each
    output row and tap row ``a`` it loads the padded input row once (``BLOCK_C x BLOCK_WIN``) and takes
    the ``k`` column taps from it in registers (``tl.gather`` along the row: warp shuffles when compiled),
    so x is read k times per output row instead of k*k times; the per-pixel weights are shared by the
    channels."""
    c_blk, h_blk, bg, b, g = program_tile(n_cblk, n_hblk, G)  # bg = sample * G + group

    hw = H * W
    howo = Ho * Wo
    c_offs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (c_offs < CG)[:, None]
    c_row = c_offs.to(tl.int64)[:, None]
    x_base = x_ptr + (b * C + g * CG) * hw + c_row * hw
    o_base = out_ptr + (b * C + g * CG) * howo + c_row * howo
    w_base = w_ptr + bg * (K * K) * howo
    ow = tl.arange(0, BLOCK_W)
    ow_ok = ow < Wo
    iw = tl.arange(0, BLOCK_WIN) - PAD  # column j of the padded row is input column j - PAD
    col_ok = (iw >= 0) & (iw < W)

    for r in range(0, ROWS):
        oh = h_blk * ROWS + r
        if oh < Ho:
            acc = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
            for a in tl.static_range(K):
                ih = oh * STRIDE + a * DIL - PAD
                ok = col_ok & (iw * 0 + ih >= 0) & (iw * 0 + ih < H)  # (a vector: the interpreter wants one)
                xrow = tl.load(x_base + ih * W + iw[None, :], mask=cm & ok[None, :], other=0.0).to(tl.float32)
                for bb in tl.static_range(K):
                    idx = tl.where(ow_ok, ow * STRIDE + bb * DIL, 0)
                    xv = tl.gather(xrow, tl.broadcast_to(idx[None, :], (BLOCK_C, BLOCK_W)), axis=1)
                    w_row = w_base + (a * K + bb) * howo + oh * Wo
                    wt = tl.load(w_row + ow, mask=ow_ok, other=0.0).to(tl.float32)
                    acc += xv * wt[None, :]
            tl.store(o_base + oh * Wo + ow[None, :], acc.to(out_ptr.dtype.element_ty), mask=cm & ow_ok[None, :])


def involution2d_cuda_rows(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward with the row-reuse kernel (a candidate, timed beside the default one by
    ``attn-export bench --device cuda``; not yet what the op runs). Same arguments and result as
    ``op.reference``; a padded input row wider than :data:`ROWS_MAX_WIDTH` is a ``ValueError``."""
    x, weight = contiguous_pair("involution2d_cuda_rows", ("x", "weight"), x, weight)
    b, c, h, w = x.shape
    g = weight.shape[1]
    ho, wo = weight.shape[-2:]
    cg = c // g
    block_win = triton.next_power_of_2(w + 2 * padding)
    if block_win > ROWS_MAX_WIDTH:
        raise ValueError(f"involution2d_cuda_rows: padded rows of {w + 2 * padding} exceed {ROWS_MAX_WIDTH}")
    out = torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_w = triton.next_power_of_2(wo)
    block_c = min(triton.next_power_of_2(cg), max(4096 // block_win, 1), 64)
    rows = 2
    n_hblk = triton.cdiv(ho, rows)
    n_cblk = triton.cdiv(cg, block_c)
    grid = (b * g * n_hblk * n_cblk,)
    _involution2d_rows[grid](
        x,
        weight,
        out,
        c,
        h,
        w,
        ho,
        wo,
        g,
        cg,
        n_hblk,
        n_cblk,
        STRIDE=stride,
        PAD=padding,
        DIL=dilation,
        K=kernel_size,
        BLOCK_C=block_c,
        BLOCK_W=block_w,
        BLOCK_WIN=block_win,
        ROWS=rows,
        num_warps=NUM_WARPS,
    )
    return out
