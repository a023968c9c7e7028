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
    SAME: tl.constexpr,
):
    """Tiles ``[BLOCK_P, BLOCK_C]``: pixels first, so the compiler lays a warp's lanes along the pixels
    (the contiguous axis of x, weight and out). With ``SAME`` (stride 1 and ``2*PAD == DIL*(K-1)``: the
    output has the input's size) a tap's source pixels are the output pixels shifted by a constant, which
    the compiler sees as contiguous. The tap columns are a loop (not unrolled): 7 taps of straight-line
    code instead of 49 keep the registers down."""
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
    c_col = c_offs.to(tl.int64)[None, :]

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in tl.static_range(K):
        ih = oh * STRIDE + a * DIL - PAD
        h_ok = p_mask & (ih >= 0) & (ih < H)
        for bb in range(K):
            iw = ow * STRIDE + bb * DIL - PAD
            ok = h_ok & (iw >= 0) & (iw < W)
            if SAME:  # noqa: SIM108  (a compile-time branch)
                src = p_offs + ((a * DIL - PAD) * W + (bb * DIL - PAD))  # W == Wo here
            else:
                src = ih * W + iw
            wt = tl.load(w_base + (a * K + bb) * howo + p_offs, mask=p_mask, other=0.0).to(tl.float32)
            xv = tl.load(x_base + c_col * hw + src[:, None], mask=ok[:, None] & c_mask[None, :], other=0.0)
            acc += xv.to(tl.float32) * wt[:, None]

    tl.store(
        o_base + c_col * howo + p_offs[:, None],
        acc.to(out_ptr.dtype.element_ty),
        mask=p_mask[:, None] & c_mask[None, :],
    )


#: Which kernel the op runs: "tiles" (``_involution2d_fwd``) or "rows" (``_involution2d_rows``).
DEFAULT = "rows"
#: The int32 arguments of each kernel, in order (the kernel report reads them).
TILES_SCALARS = ("C", "H", "W", "Ho", "Wo", "G", "CG", "n_pblk", "n_cblk")
ROWS_SCALARS = ("C", "H", "W", "Ho", "Wo", "G", "CG", "n_hblk", "n_cblk")


def tiles_plan(x_shape, w_shape, kernel_size: int, stride: int, padding: int, dilation: int):
    """``(grid, scalars, constexprs)`` of ``_involution2d_fwd`` for these shapes (ints)."""
    c, g = x_shape[1], w_shape[1]
    block_c, block_p = blocks(c // g, w_shape[3] * w_shape[4])
    return launch_plan(x_shape, w_shape, kernel_size, stride, padding, dilation, block_c, block_p)


def involution2d_cuda(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward with the op's Triton kernel (:data:`DEFAULT`); same arguments and result as
    ``op.reference``."""
    if DEFAULT == "rows" and rows_fit(x.shape, padding):
        return involution2d_cuda_rows(x, weight, kernel_size, stride, padding, dilation)
    return involution2d_cuda_tiles(x, weight, kernel_size, stride, padding, dilation)


def involution2d_cuda_tiles(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward with the tile kernel ``_involution2d_fwd`` (the TensorRT plugin's kernel too)."""
    x, weight = contiguous_pair("involution2d_cuda", ("x", "weight"), x, weight)
    b, c = x.shape[:2]
    ho, wo = weight.shape[-2:]
    out = torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid, scalars, constexprs = tiles_plan(x.shape, weight.shape, kernel_size, stride, padding, dilation)
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
    """Two whole output rows (``ROWS`` = 2) of ``BLOCK_C`` channels of one (sample, group) per program. It
    loads each padded input row the pair needs once (``BLOCK_WIN x BLOCK_C``, pixels first), takes the
    ``k`` column taps from it in registers (``tl.gather`` along the row) and uses them for both output
    rows: x is read about ``(k + 1) / 2`` times per output row (k*k in the tile kernel); the per-pixel
    weights are shared by the channels. The
    launcher gives it ``BLOCK_W // 32`` warps, so every lane owns its own pixels and the weight rows are
    read once (no warp holds a copy of another's)."""
    c_blk, h_blk, bg, b, g = program_tile(n_cblk, n_hblk, G)  # bg = sample * G + group

    hw = H * W
    howo = Ho * Wo
    c_offs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (c_offs < CG)[None, :]
    c_col = c_offs.to(tl.int64)[None, :]
    x_base = x_ptr + (b * C + g * CG) * hw + c_col * hw
    o_base = out_ptr + (b * C + g * CG) * howo + c_col * howo
    w_base = w_ptr + bg * (K * K) * howo
    ow = tl.arange(0, BLOCK_W)
    ow_ok = ow < Wo
    iw = tl.arange(0, BLOCK_WIN) - PAD  # column j of the padded row is input column j - PAD
    col_ok = (iw >= 0) & (iw < W)

    tl.static_assert(ROWS == 2, "the row-reuse kernel computes output rows in pairs")
    oh0 = h_blk * 2
    oh1 = oh0 + 1
    acc0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    # The pair reads input rows oh0*STRIDE - PAD + e, e = 0 .. STRIDE + (K-1)*DIL: each once. Row e is tap
    # row e/DIL of output row oh0 and (e - STRIDE)/DIL of oh1 (where those are whole taps); numerators
    # are kept non-negative (the same division on CUDA and in the interpreter).
    for e in range(0, STRIDE + (K - 1) * DIL + 1):
        ih = oh0 * STRIDE + e - PAD
        ok = col_ok & (iw * 0 + ih >= 0) & (iw * 0 + ih < H)  # (a vector: the interpreter wants one)
        xrow = tl.load(x_base + ih * W + iw[:, None], mask=ok[:, None] & cm, other=0.0).to(tl.float32)
        a0 = e // DIL
        use0 = (e % DIL == 0) & (a0 < K)
        n1 = e - STRIDE + STRIDE * DIL * K  # >= 0
        a1 = n1 // DIL - STRIDE * K
        use1 = (e >= STRIDE) & (n1 % DIL == 0) & (a1 < K) & (oh1 < Ho)
        for bb in tl.static_range(K):
            idx = tl.where(ow_ok, ow * STRIDE + bb * DIL, 0)
            xv = tl.gather(xrow, tl.broadcast_to(idx[:, None], (BLOCK_W, BLOCK_C)), axis=0)
            if use0:
                wt0 = tl.load(w_base + (a0 * K + bb) * howo + oh0 * Wo + ow, mask=ow_ok, other=0.0)
                acc0 += xv * wt0.to(tl.float32)[:, None]
            if use1:
                wt1 = tl.load(w_base + (a1 * K + bb) * howo + oh1 * Wo + ow, mask=ow_ok, other=0.0)
                acc1 += xv * wt1.to(tl.float32)[:, None]
    out_ok = ow_ok[:, None] & cm
    tl.store(
        o_base + oh0 * Wo + ow[:, None], acc0.to(out_ptr.dtype.element_ty), mask=out_ok & (ow * 0 + oh0 < Ho)[:, None]
    )
    tl.store(
        o_base + oh1 * Wo + ow[:, None], acc1.to(out_ptr.dtype.element_ty), mask=out_ok & (ow * 0 + oh1 < Ho)[:, None]
    )


def rows_fit(x_shape, padding: int) -> bool:
    """Whether the row-reuse kernel takes these shapes (a padded row of at most :data:`ROWS_MAX_WIDTH`)."""
    return triton.next_power_of_2(int(x_shape[3]) + 2 * padding) <= ROWS_MAX_WIDTH


def rows_plan(x_shape, w_shape, kernel_size: int, stride: int, padding: int, dilation: int):
    """``(grid, scalars, constexprs)`` of ``_involution2d_rows`` for these shapes (ints)."""
    b, c, h, w = (int(v) for v in x_shape)
    g = int(w_shape[1])
    ho, wo = int(w_shape[3]), int(w_shape[4])
    cg = c // g
    block_win = triton.next_power_of_2(w + 2 * padding)
    block_w = triton.next_power_of_2(wo)
    block_c = min(triton.next_power_of_2(cg), max(2048 // block_win, 1), 16)
    rows = 2
    n_hblk = triton.cdiv(ho, rows)
    n_cblk = triton.cdiv(cg, block_c)
    grid = b * g * n_hblk * n_cblk
    scalars = (c, h, w, ho, wo, g, cg, n_hblk, n_cblk)
    constexprs = {"STRIDE": stride, "PAD": padding, "DIL": dilation, "K": kernel_size, "BLOCK_C": block_c,
                  "BLOCK_W": block_w, "BLOCK_WIN": block_win, "ROWS": rows}  # fmt: skip
    return grid, scalars, constexprs


def rows_warps(constexprs: dict) -> int:
    """Warps of the row-reuse kernel: one lane per output column (1 to 4 warps)."""
    return max(1, min(4, constexprs["BLOCK_W"] // 32))


def involution2d_cuda_rows(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward with the row-reuse kernel. Same arguments and result as ``op.reference``; a
    padded input row wider than :data:`ROWS_MAX_WIDTH` is a ``ValueError``."""
    x, weight = contiguous_pair("involution2d_cuda_rows", ("x", "weight"), x, weight)
    if not rows_fit(x.shape, padding):
        raise ValueError(f"involution2d_cuda_rows: padded rows of {x.shape[3] + 2 * padding} exceed {ROWS_MAX_WIDTH}")
    b, c = x.shape[:2]
    ho, wo = weight.shape[-2:]
    out = torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid, scalars, constexprs = rows_plan(x.shape, weight.shape, kernel_size, stride, padding, dilation)
    _involution2d_rows[(grid,)](x, weight, out, *scalars, **constexprs, num_warps=rows_warps(constexprs))
    return out
