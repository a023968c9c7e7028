"""Triton forward kernels for ``attn_export::outlook_aggregate``.

Two kernels. Up to k=3 (VOLO's, in every released model) the op and the TensorRT plugin run the
window-row kernel ``_outlook_rows`` (see its docstring): it reads each window row's attention weights as
one coalesced tile and each needed v row once, and does the unfold, the per-window matrix product and
the fold in registers. ``attn-export kernels`` estimates it at 0.55 (s1) / 0.70 (s2) of HBM bandwidth in
fp32 at B32 C384 28x28, 12 heads, against 0.07 / 0.02 for the pixel-block kernel below, which larger
kernels (whose k^4 weights per window do not fit one tile) still run. The rest of this docstring
describes that pixel-block kernel.

Computes ``out = fold(attn @ unfold(v))`` for v (B, C, H, W) and attn (B, heads, h*w, k*k, k*k), channel
``c`` belonging to head ``c // (C / heads)``, as a gather over OUTPUT pixels (no atomics): output pixel
``(y, x)`` receives, from every tap ``t = (a, b)`` whose window centre ``n = (i, j)`` satisfies
``i*s + a - p == y`` and ``j*s + b - p == x`` (inside the ``h x w`` grid)::

    out[c, y, x] += sum_t2 attn[b, head, n, t, t2] * v[c, i*s + a2 - p, j*s + b2 - p]

with ``t2 = a2*k + b2`` and zero padding.

Stride phases. Which taps reach an output pixel depends only on its phase ``(y % s, x % s)``: tap row
``a`` reaches row ``y = ry + s*qy`` iff ``a = (ry + p) mod s`` (mod ``s``), from window row
``i = qy + (ry + p - a) / s`` (an exact division). So the output is split into its ``s x s`` phases and
each block of pixels lies in one phase: every pixel of a program has the same tap set, found with
scalar arithmetic on non-negative numbers, and the only per-pixel tests left are bounds tests
(``0 <= i < h``, inside the image). A per-pixel divisibility test ``(y + p - a) % s == 0`` instead,
compiled on CUDA, gives wrong sums at stride 2 in fp32.

Work split (``plan.py``, shared with the TensorRT plugin, which compiles this same kernel ahead of time): a 1-D
grid of ``B * heads * n_pblk * n_cblk`` programs, ``n_pblk = cdiv(H*W, BLOCK_P)``; each program owns
one ``(sample, head)`` and a block of ``BLOCK_C`` channels of that head (the attention weights it loads
serve all of them), and walks the phase-major list of pixel blocks (each phase cut into blocks of
``BLOCK_P`` of its own pixels) with a grid stride of ``n_pblk``: a program does one block, or two where
the phases' rounding adds blocks. Per block it visits the valid taps ``t`` and their ``k*k``
taps ``t2``, grouped by the source offset they read: per offset, the attention weights of every
``(t, t2)`` reading it are summed per pixel (once for all the block's channels), then one
``BLOCK_P x BLOCK_C`` tile of v is read and multiplied in. At stride 1 that is ``(2k-1)^2`` reads and
multiply-adds of v per output instead of ``k^4`` (25 against 81 for k=3). The v tile plus its halo is
the program's whole footprint, so the re-reads of it at neighbouring offsets hit the cache. Tiles are
``[BLOCK_P, BLOCK_C]``, pixels first, so a warp's lanes run along the pixels (v's contiguous axis).
Accumulates in fp32; loads and stores in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn_export.plugins._cuda_common import NUM_WARPS, contiguous_pair, program_tile
from attn_export.plugins.outlook.plan import (
    ROWS_NUM_WARPS,
    blocks,
    launch_plan,
    rows_blocks,
    rows_launch_plan,
    uses_rows,
    window_grid,
)


@triton.jit
def _phase_block(
    v_base,
    a_base,
    o_base,
    c_offs,
    c_mask,
    H,
    W,
    GH,
    GW,
    ph,
    local,
    K: tl.constexpr,
    PAD: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One block of ``BLOCK_P`` pixels of phase ``ph`` (all scalars here are non-negative)."""
    KK: tl.constexpr = K * K
    ry = ph // STRIDE
    rx = ph % STRIDE
    ny = (H - ry + STRIDE - 1) // STRIDE  # rows y = ry + s*qy inside the image
    nx = (W - rx + STRIDE - 1) // STRIDE
    # Valid tap rows a = a0 + s*ta; window row i = qy + d0 - ta. Same for columns.
    a0 = (ry + PAD) % STRIDE
    d0 = (ry + PAD - a0) // STRIDE
    n_ta = (K - a0 + STRIDE - 1) // STRIDE
    b0 = (rx + PAD) % STRIDE
    e0 = (rx + PAD - b0) // STRIDE
    n_tb = (K - b0 + STRIDE - 1) // STRIDE

    q = local * BLOCK_P + tl.arange(0, BLOCK_P)
    q_mask = q < ny * nx
    qy = q // nx
    qx = q % nx
    hw = H * W
    c_col = c_offs.to(tl.int64)[None, :] * hw  # tiles are [BLOCK_P, BLOCK_C]: pixels first (the contiguous axis)
    cm = c_mask[None, :]

    # Sum by source offset, not by tap pair: window row i = qy + d0 - ta reads v row
    # i*s + a2 - p = s*qy + u - p with u = s*(d0 - ta) + a2. Per offset (u, w) the attention weights of
    # every (tap, t2) that reads it are summed into one per-pixel coefficient (shared by the block's
    # channels), then v is read once: (2k-1)^2 reads of v per output at stride 1 instead of k^4.
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for u in range(STRIDE * (d0 - n_ta + 1), STRIDE * d0 + K):
        yy = STRIDE * qy + (u - PAD)
        y_ok = q_mask & (yy >= 0) & (yy < H)
        for wv in range(STRIDE * (e0 - n_tb + 1), STRIDE * e0 + K):
            xx = STRIDE * qx + (wv - PAD)
            src_ok = y_ok & (xx >= 0) & (xx < W)
            coef = tl.zeros((BLOCK_P,), dtype=tl.float32)
            for ta in range(0, n_ta):
                a2 = u - STRIDE * (d0 - ta)
                if (a2 >= 0) & (a2 < K):  # a scalar test: the same for every pixel of the block
                    i = qy + (d0 - ta)
                    i_ok = src_ok & (i >= 0) & (i < GH)
                    for tb in range(0, n_tb):
                        b2 = wv - STRIDE * (e0 - tb)
                        if (b2 >= 0) & (b2 < K):
                            j = qx + (e0 - tb)
                            ok = i_ok & (j >= 0) & (j < GW)
                            # n is clamped so masked lanes stay in range
                            n = tl.where(ok, i * GW + j, 0).to(tl.int64)
                            t = (a0 + ta * STRIDE) * K + (b0 + tb * STRIDE)
                            wt = tl.load(a_base + n * (KK * KK) + (t * KK + a2 * K + b2), mask=ok, other=0.0)
                            coef += wt.to(tl.float32)
            if STRIDE == 1:  # noqa: SIM108  (one phase, q is the pixel: a shift the compiler sees as contiguous)
                src = q + ((u - PAD) * W + (wv - PAD))
            else:
                src = yy * W + xx
            vv = tl.load(v_base + c_col + src[:, None], mask=src_ok[:, None] & cm, other=0.0)
            acc += vv.to(tl.float32) * coef[:, None]

    y = ry + STRIDE * qy
    x = rx + STRIDE * qx
    if STRIDE == 1:  # noqa: SIM108
        pix = q
    else:
        pix = y * W + x
    dst = o_base + c_col + pix[:, None]
    tl.store(dst, acc.to(o_base.dtype.element_ty), mask=q_mask[:, None] & cm)


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
    c_blk, p_blk, bh, b, m = program_tile(n_cblk, n_pblk, HEADS)  # bh = sample * HEADS + head

    KK: tl.constexpr = K * K
    hw = H * W
    c_offs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < CH
    # v and out share a layout: first channel of this (sample, head). attn: this (sample, head)'s matrices.
    v_base = v_ptr + (b * C + m * CH) * hw
    o_base = out_ptr + (b * C + m * CH) * hw
    a_base = attn_ptr + bh * (GH * GW) * (KK * KK)

    # Blocks of the phases, phase-major: phase ph = ry*s + rx has cdiv(ny*nx, BLOCK_P) blocks.
    total = 0
    for ph in range(0, STRIDE * STRIDE):
        ny = (H - ph // STRIDE + STRIDE - 1) // STRIDE
        nx = (W - ph % STRIDE + STRIDE - 1) // STRIDE
        total += (ny * nx + BLOCK_P - 1) // BLOCK_P
    for blk in range(p_blk, total, n_pblk):
        # find blk's phase and its block index inside that phase (a scan over the s*s phases)
        start = 0
        sel = 0
        local = 0
        for ph in range(0, STRIDE * STRIDE):
            ny = (H - ph // STRIDE + STRIDE - 1) // STRIDE
            nx = (W - ph % STRIDE + STRIDE - 1) // STRIDE
            nb = (ny * nx + BLOCK_P - 1) // BLOCK_P
            hit = (blk >= start) & (blk < start + nb)
            sel = tl.where(hit, ph, sel)
            local = tl.where(hit, blk - start, local)
            start += nb
        _phase_block(v_base, a_base, o_base, c_offs, c_mask, H, W, GH, GW, sel, local, K, PAD, STRIDE, BLOCK_C, BLOCK_P)


# ------------------------------------------------------------------------------ window rows (k <= 3)
@triton.jit
def _v_row(v_base, c_col, cm, vcol, vcol_ok, row, H, W):
    """Row ``row`` of v at columns ``vcol`` for the block's channels, ``[BLOCK_V, BLOCK_C]`` in fp32 (zero
    outside the image)."""
    ok = vcol_ok & (vcol * 0 + row >= 0) & (vcol * 0 + row < H)  # (a vector: the interpreter wants one)
    return tl.load(v_base + c_col + (row * W + vcol)[:, None], mask=ok[:, None] & cm, other=0.0).to(tl.float32)


@triton.jit
def _outlook_rows(
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
    n_tile,
    n_xblk,
    n_cblk,
    K: tl.constexpr,
    PAD: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_J: tl.constexpr,
    ROWS: tl.constexpr,
    KK2P: tl.constexpr,
):
    """``ROWS`` output rows x ``BLOCK_V - 2(k-1)`` output columns x ``BLOCK_C`` channels of one (sample,
    head) per program, streamed by window row (``plan.rows_launch_plan``).

    Per window row ``i`` that reaches the program's rows it reads two coalesced tiles, once each:

    - the attention weights of the row's windows ``[BLOCK_J, k^4]``: the windows of one row are
      consecutive, so the tile is one contiguous run (lanes along the ``k^4`` axis);
    - the ``k`` rows of v the windows read, each ``[BLOCK_V, BLOCK_C]``, pixels first (lanes along a row).

    Everything else happens in registers: ``tl.gather`` takes each ``(t, t2)`` weight column of the tile
    and each window's ``t2`` tap of v (``unfold``), ``z_t = sum_t2 attn[., t, t2] v_t2`` is the per-window
    matrix product, and a gather along the columns folds ``z_t`` onto the output row of tap ``t``
    (``fold``), accumulated for the program's ``ROWS`` rows. Each (window, tap) is computed by exactly one
    program (the one that owns its output row), so the arithmetic is the official ``k^4`` multiply-adds
    per window and channel; the reads are the attention weights about ``1 + (k-1)/(s*ROWS)`` times and v
    about ``k (ROWS + k - 1) / (s*ROWS)`` times. Integer divisions keep their numerators non-negative
    (CUDA and the interpreter round negative ones differently)."""
    c_blk, tile, bh, b, m = program_tile(n_cblk, n_tile, HEADS)  # bh = sample * HEADS + head
    rb = tile // n_xblk
    xb = tile % n_xblk
    R: tl.constexpr = K - 1
    KK: tl.constexpr = K * K
    KK2: tl.constexpr = KK * KK
    TW: tl.constexpr = BLOCK_V - 2 * R  # output columns per program
    hw = H * W
    c_offs = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (c_offs < CH)[None, :]
    c_col = c_offs.to(tl.int64)[None, :] * hw
    v_base = v_ptr + (b * C + m * CH) * hw
    o_base = out_ptr + (b * C + m * CH) * hw
    a_base = attn_ptr + bh * (GH * GW) * KK2

    y0 = rb * ROWS
    x0 = xb * TW
    vx0 = x0 - R  # v column of the tile's first column
    # windows j = jlo + jj: every window that reaches output columns [x0, x0 + TW); ceil((x0 + p - R) / s)
    jlo = tl.maximum((x0 + PAD - R + STRIDE * K + STRIDE - 1) // STRIDE - K, 0)
    jj = tl.arange(0, BLOCK_J)
    jcol = jlo + jj
    j_ok = jcol < GW
    # window rows reaching output rows [y0, y0 + ROWS)
    i_lo = tl.maximum((y0 + PAD - R + STRIDE * K + STRIDE - 1) // STRIDE - K, 0)
    i_hi = tl.minimum((y0 + ROWS - 1 + PAD) // STRIDE, GH - 1)

    rr = tl.arange(0, KK2P)
    a_off = jcol.to(tl.int64)[:, None] * KK2 + rr[None, :]
    a_ok = j_ok[:, None] & (rr < KK2)[None, :]
    vcol = vx0 + tl.arange(0, BLOCK_V)  # the v rows' columns
    vcol_ok = (vcol >= 0) & (vcol < W)
    xs = tl.arange(0, BLOCK_V)  # output column x0 + xs
    rows3 = tl.arange(0, ROWS)[:, None, None]

    acc = tl.zeros((ROWS, BLOCK_V, BLOCK_C), dtype=tl.float32)
    for i in range(i_lo, i_hi + 1):
        att = tl.load(a_base + i * GW * KK2 + a_off, mask=a_ok, other=0.0).to(tl.float32)
        vr = i * STRIDE - PAD  # v row of tap row 0; tap row a lands on output row vr + a
        v0 = _v_row(v_base, c_col, cm, vcol, vcol_ok, vr, H, W)
        v1 = v0
        v2 = v0
        if K > 1:
            v1 = _v_row(v_base, c_col, cm, vcol, vcol_ok, vr + 1, H, W)
        if K > 2:
            v2 = _v_row(v_base, c_col, cm, vcol, vcol_ok, vr + 2, H, W)
        for t in range(0, KK):  # a loop, not unrolled: the body is k*k gathers and multiply-adds
            a = t // K
            bb = t % K
            r = vr + a - y0  # the program's row that tap t of this window row lands on
            if (r >= 0) & (r < ROWS):
                z = tl.zeros((BLOCK_J, BLOCK_C), dtype=tl.float32)
                for t2 in tl.static_range(KK):
                    coef = tl.gather(att, tl.full((BLOCK_J, 1), 0, tl.int32) + (t * KK + t2), axis=1)
                    # window j's tap t2 = (a2, b2) is tile column j*s - p + b2 - vx0 of row a2; the windows
                    # past the program's last useful one are clamped (never folded)
                    src = tl.minimum(jcol * STRIDE + (t2 % K - PAD) - vx0, BLOCK_V - 1)
                    idx = tl.broadcast_to(src[:, None], (BLOCK_J, BLOCK_C))
                    if t2 // K == 0:
                        z += coef * tl.gather(v0, idx, axis=0)
                    elif t2 // K == 1:
                        z += coef * tl.gather(v1, idx, axis=0)
                    else:
                        z += coef * tl.gather(v2, idx, axis=0)
                # fold: output column x = j*s - p + bb, so j = (x + p - bb) / s where that divides
                num = x0 + xs + (PAD - bb + STRIDE * K)  # >= 0
                jsel = num // STRIDE - K - jlo
                ok = (num % STRIDE == 0) & (jsel >= 0) & (jsel < BLOCK_J) & (jsel + jlo < GW) & (xs < TW)
                idx = tl.broadcast_to(tl.where(ok, jsel, 0)[:, None], (BLOCK_V, BLOCK_C))
                zrow = tl.where(ok[:, None], tl.gather(z, idx, axis=0), 0.0)
                acc += tl.where(rows3 == r, zrow[None, :, :], 0.0)

    y = y0 + tl.arange(0, ROWS)
    x = x0 + xs
    o_ok = ((y < H)[:, None] & ((xs < TW) & (x < W))[None, :])[:, :, None] & cm[None, :, :]
    dst = o_base + c_col[None, :, :] + (y[:, None] * W + x[None, :])[:, :, None]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


def outlook_aggregate_cuda(
    v: torch.Tensor, attn: torch.Tensor, kernel_size: int, padding: int, stride: int
) -> torch.Tensor:
    """Outlook aggregation with the Triton kernels; same arguments and result as ``op.reference``. Kernels
    up to 3x3 (VOLO's; ``plan.uses_rows``) run the window-row kernel ``_outlook_rows``, larger ones the
    pixel-block kernel ``_outlook_aggregate_fwd``."""
    v, attn = contiguous_pair("outlook_aggregate_cuda", ("v", "attn"), v, attn)
    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    gh, gw = window_grid(v.shape, kernel_size, padding, stride)
    if gh <= 0 or gw <= 0:  # no windows: nothing is folded back
        return out.zero_()
    _, c, h, w = v.shape
    ch = c // attn.shape[1]
    if uses_rows(kernel_size):
        blk = rows_blocks(ch, w, kernel_size, stride)
        grid, scalars, constexprs = rows_launch_plan(v.shape, attn.shape, kernel_size, padding, stride, *blk)
        _outlook_rows[(grid,)](v, attn, out, *scalars, **constexprs, num_warps=ROWS_NUM_WARPS)
        return out
    grid, scalars, constexprs = launch_plan(v.shape, attn.shape, kernel_size, padding, stride, *blocks(ch, h * w))
    _outlook_aggregate_fwd[(grid,)](v, attn, out, *scalars, **constexprs, num_warps=NUM_WARPS)
    return out
