"""Triton forward kernel for ``attn_export::outlook_aggregate``.

Computes ``out = fold(attn @ unfold(v))`` for v (B, C, H, W) and attn (B, heads, h*w, k*k, k*k), channel
``c`` belonging to head ``c // (C / heads)``, as a gather over OUTPUT pixels (no atomics): output pixel
``(y, x)`` receives, from every tap ``t = (a, b)`` whose window centre ``n = (i, j)`` satisfies
``i*s + a - p == y`` and ``j*s + b - p == x`` (skipped unless divisible and inside the ``h x w`` grid)::

    out[c, y, x] += sum_t2 attn[b, head, n, t, t2] * v[c, i*s + a2 - p, j*s + b2 - p]

with ``t2 = a2*k + b2`` and zero padding. Work split: a 1-D grid; each program owns one
``(sample, head)``, a block of ``BLOCK_C`` channels of that head and a block of ``BLOCK_P`` flattened
output pixels; it loops over the ``k*k`` taps ``t`` and, per tap, the ``k*k`` taps ``t2``, each step one
per-pixel attention row (shared by the block's channels) times a gathered ``BLOCK_C x BLOCK_P`` tile of
v. Accumulates in fp32; stores in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _outlook_aggregate_fwd(
    v_ptr,
    attn_ptr,
    out_ptr,
    C,
    H,
    W,
    GH,
    GW,
    HEADS,
    CH,
    n_pblk,
    n_cblk,
    K: tl.constexpr,
    PAD: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    c_blk = pid % n_cblk
    rest = pid // n_cblk
    p_blk = rest % n_pblk
    bh = (rest // n_pblk).to(tl.int64)  # sample * HEADS + head, int64 for the base offsets below
    b = bh // HEADS
    m = bh % HEADS

    KK: tl.constexpr = K * K
    hw = H * W
    c_offs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    p_offs = p_blk * BLOCK_P + tl.arange(0, BLOCK_P)
    c_mask = c_offs < CH
    p_mask = p_offs < hw
    y = p_offs // W
    x = p_offs % W

    # v and out share a layout: first channel of this (sample, head). attn: this (sample, head)'s matrices.
    v_base = v_ptr + (b * C + m * CH) * hw
    o_base = out_ptr + (b * C + m * CH) * hw
    a_base = attn_ptr + bh * (GH * GW) * (KK * KK)
    c_row = c_offs.to(tl.int64)[:, None] * hw
    cm = c_mask[:, None]

    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for a in tl.static_range(K):
        # window row i with i*s + a - p == y; C-style % and // are only exact for a non-negative numerator.
        num_i = y + PAD - a
        i = num_i // STRIDE
        i_ok = (num_i >= 0) & (num_i % STRIDE == 0) & (i < GH)
        for bb in tl.static_range(K):
            num_j = x + PAD - bb
            j = num_j // STRIDE
            ok = p_mask & i_ok & (num_j >= 0) & (num_j % STRIDE == 0) & (j < GW)
            # attention row (n, t, :) of every pixel's window; n is clamped so masked lanes stay in range.
            n = tl.where(ok, i * GW + j, 0).to(tl.int64)
            a_row = a_base + n * (KK * KK) + (a * K + bb) * KK
            for a2 in range(K):
                yy = i * STRIDE + a2 - PAD
                row_ok = ok & (yy >= 0) & (yy < H)
                for b2 in range(K):
                    xx = j * STRIDE + b2 - PAD
                    src_ok = row_ok & (xx >= 0) & (xx < W)
                    wt = tl.load(a_row + (a2 * K + b2), mask=src_ok, other=0.0).to(tl.float32)
                    vv = tl.load(v_base + c_row + (yy * W + xx)[None, :], mask=cm & src_ok[None, :], other=0.0).to(
                        tl.float32
                    )
                    acc += vv * wt[None, :]

    tl.store(o_base + c_row + p_offs[None, :], acc.to(out_ptr.dtype.element_ty), mask=cm & p_mask[None, :])


def outlook_aggregate_triton(
    v: torch.Tensor, attn: torch.Tensor, kernel_size: int, padding: int, stride: int
) -> torch.Tensor:
    """Outlook aggregation with the Triton kernel; same arguments and result as ``op.reference``."""
    if v.dtype not in _SUPPORTED or attn.dtype != v.dtype:
        raise TypeError(
            f"outlook_aggregate_triton: v and attn must share one of {_SUPPORTED}, got {v.dtype} and {attn.dtype}"
        )
    v = v.contiguous()
    attn = attn.contiguous()
    b, c, h, w = v.shape
    heads = attn.shape[1]
    gh = (h + 2 * padding - kernel_size) // stride + 1
    gw = (w + 2 * padding - kernel_size) // stride + 1
    ch = c // heads
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    if gh <= 0 or gw <= 0:  # no windows: nothing is folded back
        return out.zero_()

    block_p = min(max(triton.next_power_of_2(h * w), 16), 64)
    block_c = min(triton.next_power_of_2(ch), 32)
    n_pblk = triton.cdiv(h * w, block_p)
    n_cblk = triton.cdiv(ch, block_c)
    grid = (b * heads * n_pblk * n_cblk,)
    _outlook_aggregate_fwd[grid](
        v,
        attn,
        out,
        c,
        h,
        w,
        gh,
        gw,
        heads,
        ch,
        n_pblk,
        n_cblk,
        K=kernel_size,
        PAD=padding,
        STRIDE=stride,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=4,
    )
    return out
