"""The outlook kernel's index arithmetic, re-run in plain torch with C semantics, against a naive loop.

Triton's integer ``//`` and ``%`` truncate toward zero as in C (``arith.divsi``/``arith.remsi`` when
compiled, ``np.fmod`` in the interpreter), unlike Python's floor division. A kernel whose masks or
indices lean on a negative numerator behaves differently from what its Python reading suggests, and
a kernel test only sees the shapes it runs. Here the outlook kernel's whole schedule (grid, grid-stride
walk over the phase blocks, the phase scan, per-lane pixel and window indices, masks) is replayed
with ``torch.div(rounding_mode="trunc")`` and ``torch.fmod`` for every ``//`` and ``%``, for many
shapes, strides and paddings: the products ``attn[n, t, t2] * v[src]`` it adds into each output pixel
must be exactly those of a naive loop over windows and taps, and every output pixel must be stored
once. No GPU and no Triton needed; fast.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

I32 = torch.int32


def cdiv_c(a, b):
    """C (and Triton) integer division: truncation toward zero."""
    return torch.div(torch.as_tensor(a, dtype=I32), b, rounding_mode="trunc")


def cmod_c(a, b):
    """C (and Triton) remainder: the sign of the dividend."""
    return torch.fmod(torch.as_tensor(a, dtype=I32), b)


def _out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def kernel_schedule(h, w, k, p, s, block_p, n_pblk=None, phase_offset=None):
    """Replay ``_outlook_aggregate_fwd``'s index arithmetic for one (sample, head, channel block).

    Returns ``(contributions, stores)``: Counters of ``(y, x, n, t, t2, yy, xx)`` (output pixel, window,
    tap, inner tap, source pixel of v) and of stored pixels ``(y, x)``. ``phase_offset`` replaces the
    kernel's ``a0`` formula (a negative control: a wrong formula must be caught).
    """
    gh, gw = _out_size(h, k, s, p), _out_size(w, k, s, p)
    n_pblk = n_pblk if n_pblk is not None else -(-(h * w) // block_p)
    contributions, stores = Counter(), Counter()

    def phase_dims(ph):
        ny = cdiv_c(h - cdiv_c(ph, s) + s - 1, s)
        nx = cdiv_c(w - cmod_c(ph, s) + s - 1, s)
        return ny, nx

    total = 0
    for ph in range(s * s):
        ny, nx = phase_dims(ph)
        total += int(cdiv_c(ny * nx + block_p - 1, block_p))
    for p_blk in range(n_pblk):
        for blk in range(p_blk, total, n_pblk):
            start, sel, local = 0, 0, 0
            for ph in range(s * s):
                ny, nx = phase_dims(ph)
                nb = int(cdiv_c(ny * nx + block_p - 1, block_p))
                if start <= blk < start + nb:
                    sel, local = ph, blk - start
                start += nb
            ry, rx = int(cdiv_c(sel, s)), int(cmod_c(sel, s))
            ny, nx = phase_dims(sel)
            a0 = int(cmod_c(ry + p, s)) if phase_offset is None else phase_offset(ry + p, s)
            d0 = int(cdiv_c(ry + p - a0, s))
            n_ta = int(cdiv_c(k - a0 + s - 1, s))
            b0 = int(cmod_c(rx + p, s)) if phase_offset is None else phase_offset(rx + p, s)
            e0 = int(cdiv_c(rx + p - b0, s))
            n_tb = int(cdiv_c(k - b0 + s - 1, s))

            q = local * block_p + torch.arange(block_p, dtype=I32)
            q_mask = q < ny * nx
            qy, qx = cdiv_c(q, nx), cmod_c(q, nx)
            y, x = ry + s * qy, rx + s * qx
            for u in range(s * (d0 - n_ta + 1), s * d0 + k):
                yy = s * qy + (u - p)
                y_ok = q_mask & (yy >= 0) & (yy < h)
                for wv in range(s * (e0 - n_tb + 1), s * e0 + k):
                    xx = s * qx + (wv - p)
                    src_ok = y_ok & (xx >= 0) & (xx < w)
                    for ta in range(n_ta):
                        a2 = u - s * (d0 - ta)
                        if not (0 <= a2 < k):
                            continue
                        i = qy + (d0 - ta)
                        i_ok = src_ok & (i >= 0) & (i < gh)
                        for tb in range(n_tb):
                            b2 = wv - s * (e0 - tb)
                            if not (0 <= b2 < k):
                                continue
                            j = qx + (e0 - tb)
                            ok = i_ok & (j >= 0) & (j < gw)
                            n = torch.where(ok, i * gw + j, 0)
                            t = (a0 + ta * s) * k + (b0 + tb * s)
                            for lane in ok.nonzero().flatten().tolist():
                                key = (int(y[lane]), int(x[lane]), int(n[lane]), t, a2 * k + b2)
                                contributions[(*key, int(yy[lane]), int(xx[lane]))] += 1
            for lane in q_mask.nonzero().flatten().tolist():
                stores[int(y[lane]), int(x[lane])] += 1
    return contributions, stores


def naive_contributions(h, w, k, p, s):
    """Every product ``attn[n, t, t2] * v[src]`` of the fold whose output pixel and source pixel are both
    inside the image (the others add zero), by the definition of unfold-matmul-fold."""
    gh, gw = _out_size(h, k, s, p), _out_size(w, k, s, p)
    out = Counter()
    for i, j, a, b, a2, b2 in itertools.product(range(gh), range(gw), *[range(k)] * 4):
        y, x = i * s + a - p, j * s + b - p
        yy, xx = i * s + a2 - p, j * s + b2 - p
        if 0 <= y < h and 0 <= x < w and 0 <= yy < h and 0 <= xx < w:
            out[y, x, i * gw + j, a * k + b, a2 * k + b2, yy, xx] += 1
    return out


def _cases():
    # (H, W, k, padding, stride, BLOCK_P): odd and even sizes, stride above and below k, paddings
    # from none to k-1 (negative numerators everywhere), blocks smaller than a phase and larger.
    cases = []
    for (h, w), k, s in itertools.product([(7, 9), (8, 8), (5, 6), (1, 4), (11, 3)], (1, 2, 3, 5), (1, 2, 3)):
        for p in sorted({0, k // 2, k - 1}):
            if _out_size(h, k, s, p) >= 1 and _out_size(w, k, s, p) >= 1:
                cases.append((h, w, k, p, s, 16))
    cases += [(13, 12, 7, 3, 2, 16), (9, 9, 3, 1, 2, 64), (6, 10, 3, 2, 4, 16), (28, 28, 3, 1, 2, 64)]
    return cases


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "{}x{}_k{}p{}s{}_bp{}".format(*c))
def test_outlook_schedule_makes_exactly_the_folds_contributions(case):
    h, w, k, p, s, block_p = case
    contributions, stores = kernel_schedule(h, w, k, p, s, block_p)
    assert contributions == naive_contributions(h, w, k, p, s)
    assert stores == Counter({(y, x): 1 for y in range(h) for x in range(w)})  # each pixel stored once


def test_a_grid_smaller_than_the_block_count_still_covers_every_block():
    """The grid-stride walk: fewer programs than phase blocks (the TensorRT plan's rounding)."""
    h, w, k, p, s = 9, 7, 3, 1, 2
    contributions, stores = kernel_schedule(h, w, k, p, s, 16, n_pblk=1)
    assert contributions == naive_contributions(h, w, k, p, s)
    assert stores == Counter({(y, x): 1 for y in range(h) for x in range(w)})


def test_the_replay_catches_floor_versus_trunc_mistakes():
    """Negative control: a phase formula that is wrong for some phases must not pass.

    ``(r - s) % s`` is ``r % s`` under Python's floor semantics but negative under C's for ``r < s``:
    the Python reading of such a line looks right and the kernel would get it wrong.
    """
    h, w, k, p, s = 7, 9, 3, 1, 2
    wrong = lambda num, s_: int(cmod_c(num - s_, s_))  # noqa: E731  (negative for num < s in C)
    contributions, _ = kernel_schedule(h, w, k, p, s, 16, phase_offset=wrong)
    assert contributions != naive_contributions(h, w, k, p, s)
    # and under Python's floor semantics the same expression is the right one
    floor = lambda num, s_: (num - s_) % s_  # noqa: E731
    contributions, _ = kernel_schedule(h, w, k, p, s, 16, phase_offset=floor)
    assert contributions == naive_contributions(h, w, k, p, s)
