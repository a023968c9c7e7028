"""ONNX lowering of ``involution2d`` into standard ops (target ``ort``): flat "wide-grid" taps.

The padded input is flattened per channel, and the output is computed on a *wide* grid: ``ho`` rows
of ``wq`` columns, where ``wq`` is the padded row width, so ``wq - wo`` columns per row are junk
and cropped at the end. On that grid every tap ``(a, b)`` reads one *contiguous* range of the flat
input, starting at ``a * d * wq + b * d``: a Slice that is a plain block copy (instead of a 2-D
strided window whose inner runs are ``wo`` elements). Per tap: Slice, Mul by that tap's kernel plane
(broadcast over the ``C / G`` channels of a group), Add into the accumulator; every tensor in the
loop is one ``(B, C, ho, wq)`` plane set, small enough to stay in cache. ``3 k^2 + ~8`` nodes.

With ``stride > 1`` the padded input is first split into its ``s x s`` phases (one Reshape and one
Transpose): tap ``(a, b)`` reads phase ``(a d mod s, b d mod s)`` at offset
``(a d // s) * wq + b d // s``, again a contiguous range, so one code path covers every stride,
padding and dilation. The batch is never folded into an attribute. With a dynamic height and width
(``--dynamic-hw``) the same graph is built with every size computed from the input's ``Shape``
(:mod:`attn_export.plugins._onnx`), so nothing of the traced size stays in a constant.

Measured on onnxruntime 1.31 CPU (AMD EPYC, AVX2), the op alone at B=4, C=64, 40x40, k=7, G=4:
one interleaved run of all candidates, minimum over 20 rounds, 1 intra-op thread (the machine was
shared with other jobs; 2-thread runs were distorted by it, see docs/benchmarks.md):

=======================================================  =====  =====
candidate                                                nodes  ms
=======================================================  =====  =====
column stack: k column Slices + Concat (k-fold buffer),    46   21.4
  per kernel row a: Slice rows + Mul + ReduceSum over
  the k taps + Add (the previous lowering)
row stack (the same with rows and columns swapped)         46   20.3
full unfold: 49 Slices + Concat, one Mul, one ReduceSum    56   28.8
2-D strided tap windows: Slice + Mul + Add per tap        248   13.5
  the same, one Sum of all 49 products                    153   17.8
flat column stack + Mul + ReduceSum per kernel row         44   25.4
flat taps, products summed by Sum per row / 3 / 2 taps   ~120   16.1 / 15.6 / 16.7
flat taps, Slice + Mul + Add per tap (kept)               153   13.0
(torch eager, this op: in-place ``addcmul_`` per tap)       -    5.4
=======================================================  =====  =====

Large intermediate buffers (the k- and k*k-fold stacks, or many live products) leave the cache and
lose; per-node profiles of the column stack put most of its time in the row Slices (inner runs of 40
elements), the Mul and the ReduceSum over a middle axis. The flat taps keep every tensor at one
output-sized plane set. ONNX has no in-place multiply-add, so each tap costs three passes (Slice,
Mul, Add) where torch's ``addcmul_`` needs one: that is the remaining 2.4x to eager.
"""

from __future__ import annotations

from onnxscript import opset18 as op

from attn_export.plugins._onnx import Size, cdiv, ints, maximum, same, spatial, static_dim, vec
from attn_export.plugins._taps import out_size


def wide_grid(size_h: Size, size_w: Size, ho: Size, wo: Size, k: int, s: int, p: int, d: int) -> tuple[Size, Size]:
    """``(hq, wq)``: rows and row width of each flat phase plane.

    ``wq`` holds a padded input row (``ceil(Wp / s)``) and leaves room for the widest tap offset of
    the last output column without wrapping into the next row; ``hq`` has one extra row so that the
    last tap's range, junk columns included, stays inside the plane. Sizes may be :class:`Dim`
    (a ``--dynamic-hw`` export): then both are computed in the graph.
    """
    reach = ((k - 1) * d) // s
    wq = maximum(cdiv(size_w + 2 * p, s), wo + reach)
    hq = maximum(cdiv(size_h + 2 * p, s), ho + reach + 1)
    return hq, wq


def phase_planes(x, groups: int, hq: Size, wq: Size, s: int, p: int):
    """(B, C, H, W) -> (B, groups, s*s, C/groups, hq*wq): zero-padded, phase-split, flattened."""
    h, w = spatial(x)
    c = static_dim(x, 1, "the channel count")
    cg = c // groups
    xp = op.Pad(x, vec([0, 0, p, p, 0, 0, hq * s - h - p, wq * s - w - p]))
    if s == 1:
        return op.Reshape(xp, vec([0, groups, 1, cg, hq * wq]))
    xf = op.Reshape(xp, vec([0, groups, cg, hq, s, wq, s]))
    xf = op.Transpose(xf, perm=[0, 1, 4, 6, 2, 3, 5])  # B, G, s, s, cg, hq, wq
    return op.Reshape(xf, vec([0, groups, s * s, cg, hq * wq]))


def split_taps(planes, count: int) -> list:
    """(B, G, count, 1, N) -> ``count`` values of shape (B, G, 1, 1, N)."""
    return [planes] if count == 1 else list(op.Split(planes, axis=2, num_outputs=count))


def aggregate(xf, kernels: list, k: int, s: int, d: int, ho: Size, wq: Size):
    """``sum_t kernels[t] * (tap t of xf)`` on the wide grid: (B, G, 1, C/G, ho*wq)."""
    n = ho * wq
    acc = None
    for t in range(k * k):
        a, b = divmod(t, k)
        phase = (a * d % s) * s + (b * d % s)
        start = (a * d // s) * wq + (b * d // s)
        window = op.Slice(xf, vec([phase, start]), vec([phase + 1, start + n]), ints([2, 4]))
        term = op.Mul(window, kernels[t])
        acc = term if acc is None else op.Add(acc, term)
    return acc


def crop(acc, c: int, ho: Size, wo: Size, wq: Size):
    """(B, G, 1, C/G, ho*wq) -> (B, C, ho, wo): drop the junk columns of the wide grid."""
    out = op.Reshape(acc, vec([0, c, ho, wq]))
    return out if same(wq, wo) else op.Slice(out, ints([0]), vec([wo]), ints([3]))


def portable(x, weight, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
    h, w = spatial(x)
    c = static_dim(x, 1, "involution2d: the channel count")
    groups = static_dim(weight, 1, "involution2d: the group count")
    k, s, p, d = kernel_size, stride, padding, dilation
    ho, wo = out_size(h, k, s, p, d), out_size(w, k, s, p, d)
    hq, wq = wide_grid(h, w, ho, wo, k, s, p, d)
    xf = phase_planes(x, groups, hq, wq, s, p)
    wf = weight if same(wq, wo) else op.Pad(weight, vec([0, 0, 0, 0, 0, 0, 0, 0, 0, wq - wo]))
    wf = op.Reshape(wf, vec([0, groups, k * k, 1, ho * wq]))
    return crop(aggregate(xf, split_taps(wf, k * k), k, s, d, ho, wq), c, ho, wo, wq)
