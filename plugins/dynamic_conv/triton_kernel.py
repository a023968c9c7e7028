"""Triton forward kernel for ``attn_export::dynamic_conv2d``.

Computes a per-sample grouped convolution, ``out[b] = conv2d(x[b], weight[b], stride, padding,
dilation, groups)`` with x (B, Cin, H, W) and weight (B, Cout, Cin/groups, kH, kW), as an implicit
GEMM: for each sample and group, ``out[co, p] = sum_{tap, ci} W[co, ci, tap] * X[ci, pixel(p, tap)]``.

Work split: a 1-D grid; each program owns one ``(sample, group)``, a block of ``BLOCK_CO`` output
channels of that group and a block of ``BLOCK_P`` flattened output pixels. It loops over the
``kH x kW`` taps and, per tap, over chunks of ``BLOCK_CI`` input channels, multiplying a
``BLOCK_CO x BLOCK_CI`` weight tile with a gathered ``BLOCK_CI x BLOCK_P`` input tile via ``tl.dot``
(masked loads give the zero padding and the ragged edges). Accumulates in fp32 (fp32 inputs use IEEE
fp32 products, not TF32); stores in the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


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
    BLOCK_CI: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    co_blk = pid % n_coblk
    rest = pid // n_coblk
    p_blk = rest % n_pblk
    bg = (rest // n_pblk).to(tl.int64)  # sample * GROUPS + group, int64 for the base offsets below
    b = bg // GROUPS
    g = bg % GROUPS

    hw = H * W
    howo = HO * WO
    co = co_blk * BLOCK_CO + tl.arange(0, BLOCK_CO)
    p = p_blk * BLOCK_P + tl.arange(0, BLOCK_P)
    ci = tl.arange(0, BLOCK_CI)
    co_mask = co < COUT_G
    p_mask = p < howo
    oh = p // WO
    ow = p % WO

    # x: first input channel of this (sample, group); weight: its first output channel's kernel.
    x_base = x_ptr + (b * CIN + g * CIN_G) * hw
    w_base = w_ptr + (b * COUT + g * COUT_G) * (CIN_G * KH * KW)
    o_base = out_ptr + (b * COUT + g * COUT_G) * howo
    w_rows = co.to(tl.int64)[:, None] * (CIN_G * KH * KW)

    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for r in tl.static_range(KH):
        ih = oh * SH + r * DH - PH
        h_ok = (ih >= 0) & (ih < H)
        for s in tl.static_range(KW):
            iw = ow * SW + s * DW - PW
            pix_ok = p_mask & h_ok & (iw >= 0) & (iw < W)
            pix = (ih * W + iw)[None, :]
            for ci0 in range(0, CIN_G, BLOCK_CI):
                cin = ci0 + ci
                ci_mask = cin < CIN_G
                wt = tl.load(
                    w_base + w_rows + (cin * (KH * KW) + (r * KW + s))[None, :],
                    mask=co_mask[:, None] & ci_mask[None, :],
                    other=0.0,
                )
                xt = tl.load(
                    x_base + cin.to(tl.int64)[:, None] * hw + pix,
                    mask=ci_mask[:, None] & pix_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(wt, xt, acc, input_precision=DOT_PRECISION)

    tl.store(
        o_base + co.to(tl.int64)[:, None] * howo + p[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=co_mask[:, None] & p_mask[None, :],
    )


def _block(n: int, lo: int, hi: int) -> int:
    return min(max(triton.next_power_of_2(n), lo), hi)


def dynamic_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Per-sample convolution with the Triton kernel; same arguments and result as ``op.reference``."""
    if x.dtype not in _SUPPORTED or weight.dtype != x.dtype:
        raise TypeError(
            f"dynamic_conv2d_triton: x and weight must share one of {_SUPPORTED}, got {x.dtype} and {weight.dtype}"
        )
    x = x.contiguous()
    weight = weight.contiguous()
    b, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape[1:]
    sh, sw = (int(v) for v in stride)
    ph, pw = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty((b, cout, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if cin_g == 0:  # an empty reduction
        return out.zero_()

    cout_g = cout // groups
    # tl.dot needs every tile dimension >= 16.
    block_co = _block(cout_g, 16, 64)
    block_ci = _block(cin_g, 16, 32)
    block_p = _block(ho * wo, 16, 64)
    n_pblk = triton.cdiv(ho * wo, block_p)
    n_coblk = triton.cdiv(cout_g, block_co)
    grid = (b * groups * n_pblk * n_coblk,)
    _dynamic_conv2d_fwd[grid](
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
        n_pblk,
        n_coblk,
        SH=sh,
        SW=sw,
        PH=ph,
        PW=pw,
        DH=dh,
        DW=dw,
        KH=kh,
        KW=kw,
        BLOCK_CO=block_co,
        BLOCK_CI=block_ci,
        BLOCK_P=block_p,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # None: the backend default
        num_warps=4,
    )
    return out
