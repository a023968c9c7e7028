"""Triton forward kernel for ``attn_export::involution2d``.

Computes, for x (B, C, H, W) and a per-pixel kernel weight (B, G, k*k, Ho, Wo) shared by the
``cg = C / G`` channels of a group::

    out[b, g*cg + c, i, j] = sum_t weight[b, g, t, i, j] * x[b, g*cg + c, i*s + a*d - p, j*s + bb*d - p]

with ``t = a*k + bb`` and zeros outside the image. Work split: a 1-D grid; each program owns one
``(sample, group)``, a block of ``BLOCK_C`` channels of that group and a block of ``BLOCK_P`` flattened
output pixels, and loops over the ``k*k`` taps: per tap it loads one weight row (shared by all the
block's channels) and gathers one ``BLOCK_C x BLOCK_P`` tile of x (masked for padding and ragged
edges). Accumulates in fp32; stores in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


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
    pid = tl.program_id(0)
    c_blk = pid % n_cblk
    rest = pid // n_cblk
    p_blk = rest % n_pblk
    bg = (rest // n_pblk).to(tl.int64)  # sample * G + group, int64 for the base offsets below
    b = bg // G
    g = bg % G

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


def involution2d_triton(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward with the Triton kernel; same arguments and result as ``op.reference``."""
    if x.dtype not in _SUPPORTED or weight.dtype != x.dtype:
        raise TypeError(
            f"involution2d_triton: x and weight must share one of {_SUPPORTED}, got {x.dtype} and {weight.dtype}"
        )
    x = x.contiguous()
    weight = weight.contiguous()
    b, c, h, w = x.shape
    g = weight.shape[1]
    ho, wo = weight.shape[-2:]
    cg = c // g
    out = torch.empty((b, c, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out

    block_p = min(max(triton.next_power_of_2(ho * wo), 16), 128)
    block_c = min(triton.next_power_of_2(cg), max(4096 // block_p, 1), 32)
    n_pblk = triton.cdiv(ho * wo, block_p)
    n_cblk = triton.cdiv(cg, block_c)
    grid = (b * g * n_pblk * n_cblk,)
    _involution2d_fwd[grid](
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
        n_pblk,
        n_cblk,
        STRIDE=stride,
        PAD=padding,
        DIL=dilation,
        K=kernel_size,
        BLOCK_C=block_c,
        BLOCK_P=block_p,
        num_warps=4,
    )
    return out
