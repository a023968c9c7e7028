"""ONNX lowering of ``outlook_aggregate`` into standard ops (target ``ort``), without ``Col2Im``.

``fold(attn @ unfold(v))`` is rewritten as one per-pixel aggregation with a ``(2k-1) x (2k-1)``
kernel. Output pixel ``q`` receives, from every window ``n`` that covers it at tap ``t``
(``q = n s - p + off(t)``), ``sum_t' attn[n, t, t'] v[n s - p + off(t')]``, that is
``v[q + off(t') - off(t)]``. Grouping the terms by ``delta = off(t') - off(t)``:

``out[q] = sum_delta K_delta[q] v[q + delta]``, with
``K_delta[q] = sum_{t, t': off(t') - off(t) = delta} attn[(q + p - off(t)) / s, t, t']``

(a term counts only where ``q + p - off(t)`` is a multiple of ``s`` and the window is on the grid).
So, per head:

1. the ``k^4`` attention planes go spatial-last (one Transpose), are zero-upsampled by ``s`` (stride
   > 1 only: Reshape, Pad, Reshape), and are shifted by ``p - off(t)`` for their tap ``t`` (one Pad
   onto a zero canvas, then ``k*k`` contiguous Slices on the flattened canvas and a Concat);
2. one MatMul with a fixed 0/1 ``((2k-1)^2, k^4)`` matrix sums them into the ``(2k-1)^2`` planes of
   ``K``, directly in the flat wide-grid layout of the involution lowering;
3. the aggregation is :mod:`the involution lowering <attn_export.plugins.involution.onnx_lowering>`
   with kernel ``2k-1``, padding ``k-1``, the heads as groups.

Exact for every kernel size, padding and stride (no approximation; only the summation order
changes); for k=3 it is 25 taps over the C channels instead of 9 unfold taps, a 9x9 MatMul per window
and channel, and a 9-tap fold. With ``stride > 1`` the windows are s^2 times fewer while the
aggregation stays at full resolution, and the direct form (:func:`unfold_matmul_fold`) is faster, so
it is used there. (The table below is that of the direct form's previous version, before it lost its
5-D Transposes; see :func:`unfold_matmul_fold`.)

Measured on onnxruntime 1.31 CPU (AMD EPYC, AVX2), the op alone at B=4, C=64, 40x40, heads=2, k=3,
p=1: one interleaved run per stride, minimum over 20 rounds, 1 intra-op thread, shared machine:

==========================================================  =====  ========  =====  =====
candidate                                                   nodes  s=1       s=2    s=3
==========================================================  =====  ========  =====  =====
unfold (k*k Slices + Concat), Transpose, batched (9x9) @     26    43.3      12.2   5.9
  (9x32) MatMul over the windows, Transpose, ConvTranspose
  fold (the previous lowering; kept for s > 1)
per-pixel (2k-1)^2 kernel, 5-D Transpose of attn              95    8.3       -      -
per-pixel (2k-1)^2 kernel, 4-D Transpose of attn (kept,       96    7.9       12.7   12.3
  s = 1)
(torch eager, this op)                                        -     18.9      5.2    3.0
==========================================================  =====  ========  =====  =====

A per-node profile of the previous lowering at s=1 put ~70% of its time in the two 5-D Transposes
around the small batched MatMul; the ConvTranspose fold was about 6%.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxscript import opset18 as op

from attn_export.plugins._onnx import ints, is_static, maximum, minimum, same, spatial, static_dim, vec
from attn_export.plugins._taps import out_size
from attn_export.plugins.involution.onnx_lowering import aggregate, crop, phase_planes, split_taps


def delta_matrix(kernel_size: int, dtype: np.dtype) -> np.ndarray:
    """((2k-1)^2, k^4) 0/1 matrix: column ``t*k*k + t'`` has its 1 at the row of ``off(t') - off(t)``."""
    k = kernel_size
    kk, k2 = k * k, 2 * k - 1
    m = np.zeros((k2 * k2, kk * kk), dtype=dtype)
    for t in range(kk):
        a, b = divmod(t, k)
        for t2 in range(kk):
            a2, b2 = divmod(t2, k)
            m[(a2 - a + k - 1) * k2 + (b2 - b + k - 1), t * kk + t2] = 1
    return m


def kernel_planes(attn, hh, ww, k: int, p: int, s: int, wq):
    """(B, heads, h*w, k*k, k*k) -> K as (B, heads, (2k-1)^2, 1, hh*wq) on the wide grid of width ``wq``.

    The sizes ``hh``, ``ww``, ``wq`` are ints, or :class:`~attn_export.plugins._onnx.Dim` values computed in
    the graph (a dynamic height and width)."""
    heads = static_dim(attn, 1, "outlook_aggregate: the head count")
    kk, r = k * k, k - 1
    h, w = out_size(hh, k, s, p, 1), out_size(ww, k, s, p, 1)
    planes = op.Transpose(op.Reshape(attn, vec([0, heads, h * w, kk * kk])), perm=[0, 1, 3, 2])
    planes = op.Reshape(planes, vec([0, heads, kk * kk, h, w]))
    uh, uw = h * s, w * s
    if s > 1:  # window n sits at fine-grid row n*s: insert s-1 zeros after each value
        up = op.Reshape(planes, vec([0, heads, kk * kk, h, 1, w, 1]))
        up = op.Pad(up, ints([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, s - 1, 0, s - 1]))
        planes = op.Reshape(up, vec([0, heads, kk * kk, uh, uw]))
    # Only fine-grid rows < hh + p and columns < ww + p are ever read.
    ch, cw = minimum(uh, hh + p), minimum(uw, ww + p)
    if not (same(ch, uh) and same(cw, uw)):
        planes = op.Slice(planes, ints([0, 0]), vec([ch, cw]), ints([3, 4]))
    # Canvas: the planes at (top, left) on a zero background of width wq; tap t reads its planes
    # shifted by p - off(t) as one contiguous range of the flattened canvas.
    top = left = max(0, r - p)
    rows = maximum(hh + (p + top + 1), top + ch)
    canvas = op.Pad(planes, vec([0, 0, 0, top, left, 0, 0, 0, rows - top - ch, wq - left - cw]))
    canvas = op.Reshape(canvas, vec([0, heads, kk, kk, rows * wq]))
    n = hh * wq
    shifted = []
    for t in range(kk):
        a, b = divmod(t, k)
        start = (p - a + top) * wq + (p - b + left)
        shifted.append(op.Slice(canvas, vec([t, start]), vec([t + 1, start + n]), ints([2, 4])))
    q = shifted[0] if kk == 1 else op.Concat(*shifted, axis=2)
    q = op.Reshape(q, vec([0, heads, kk * kk, n]))
    m = op.Constant(value=onnx.numpy_helper.from_array(delta_matrix(k, attn.dtype.numpy())))
    k2 = 2 * k - 1
    return op.Reshape(op.MatMul(m, q), vec([0, heads, k2 * k2, 1, n]))


def one_hot_taps(channels: int, kernel_size: int, dtype: np.dtype) -> np.ndarray:
    """(C*k*k, 1, k, k) weights: output channel ``c*k*k + t`` picks tap ``t`` of channel ``c``."""
    kk = kernel_size * kernel_size
    eye = np.eye(kk, dtype=dtype).reshape(kk, 1, kernel_size, kernel_size)
    return np.tile(eye, (channels, 1, 1, 1))


def unfold_matmul_fold(v, attn, kernel_size: int, padding: int, stride: int):
    """The direct form, used for ``stride > 1``: the unfold as a depthwise ``Conv`` with a fixed one-hot
    kernel (output channel ``c*k*k + t`` copies tap ``t`` of channel ``c``; ``group = C``), one batched
    MatMul per window and head, and the fold as a ``ConvTranspose`` with the same one-hot kernel
    (``group = C``, never the batch), which places each tap's values at its offset and sums the
    overlaps: exactly ``F.fold``. The products with 1 and 0 of the one-hot kernels are exact.

    The MatMul is the transposed product, ``(C/heads, k*k) @ attn^T`` per window, in the layout
    ``(B, L, heads, ...)`` that VOLO computes attn in: the windows need one plain batched 2-D Transpose
    ``(B, C*k*k, L) -> (B, L, C*k*k)`` and the result one back, both of which onnxruntime runs as block
    copies, and the Transpose of attn cancels against the model's own permute (onnxruntime's transpose
    optimizer; what is left is the swap of the last two axes, which it fuses into the MatMul). The
    previous form (k*k strided Slices and a Concat, attn @ windows with two 5-D Transposes
    ``[0, 1, 4, 3, 2]`` of the windows) spent ~20% of VOLO-D1's whole onnxruntime time at batch 8 in
    those two Transposes (onnxruntime's generic element-wise path). The op alone at VOLO-D1's first
    stage (B=8, C=192, 28x28, 6 heads, k=3, p=1, s=2, attn from a permute as in VOLO), onnxruntime
    1.32, 2 threads, Intel Xeon (2 vCPUs, shared: load 3-3.5), fastest of 25 interleaved calls:
    previous form 76 ms, the transposed product with the Slice unfold 50 ms, this form 25 ms
    (torch eager's unfold/matmul/fold: 56 ms).

    With static sizes the ConvTranspose crops the padding and adds the rows the windows do not reach
    with its ``pads``/``output_padding`` attributes. Those are attributes, fixed in the graph, so with
    a dynamic height and width the ConvTranspose writes the whole ``(h-1)s+k`` canvas and a Pad (of the
    uncovered end, computed in the graph) and a Slice cut ``[p, p+H)`` out of it: the same numbers."""
    hh, ww = spatial(v)
    c = static_dim(v, 1, "outlook_aggregate: the channel count")
    heads = static_dim(attn, 1, "outlook_aggregate: the head count")
    k, p, s = kernel_size, padding, stride
    kk = k * k
    h, w = out_size(hh, k, s, p, 1), out_size(ww, k, s, p, 1)
    onehot = op.Constant(value=onnx.numpy_helper.from_array(one_hot_taps(c, k, v.dtype.numpy())))
    # unfold: a depthwise Conv whose output channel c*kk + t copies tap t of channel c (pads, stride: as F.unfold)
    cols = op.Conv(v, onehot, group=c, kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])  # B, C*kk, h, w
    # (B, C*kk, L) -> (B, L, C*kk): one plain batched 2-D transpose, viewed as (B, L, heads, C/heads, kk)
    windows = op.Transpose(op.Reshape(cols, vec([0, c * kk, h * w])), perm=[0, 2, 1])
    windows = op.Reshape(windows, vec([0, h * w, heads, c // heads, kk]))
    # per window and head, (C/heads, kk) @ attn^T: the transposed product in VOLO's own (B, L, heads, ...)
    # layout, so that onnxruntime cancels this Transpose of attn against the model's permute before it
    mixed = op.MatMul(windows, op.Transpose(attn, perm=[0, 2, 1, 4, 3]))  # B, L, heads, C/heads, kk
    mixed = op.Transpose(op.Reshape(mixed, vec([0, h * w, c * kk])), perm=[0, 2, 1])  # B, C*kk, L
    mixed = op.Reshape(mixed, vec([0, c * kk, h, w]))
    if is_static(hh, ww):
        extra = [hh + 2 * p - k - (h - 1) * s, ww + 2 * p - k - (w - 1) * s]
        return op.ConvTranspose(
            mixed, onehot, group=c, kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p], output_padding=extra
        )
    full = op.ConvTranspose(mixed, onehot, group=c, kernel_shape=[k, k], strides=[s, s])  # (h-1)s+k rows
    fh, fw = (h - 1) * s + k, (w - 1) * s + k
    end_h, end_w = maximum(hh + p - fh, 0), maximum(ww + p - fw, 0)
    full = op.Pad(full, vec([0, 0, 0, 0, 0, 0, end_h, end_w]))
    return op.Slice(full, ints([p, p]), vec([hh + p, ww + p]), ints([2, 3]))


def per_pixel_kernel(v, attn, kernel_size: int, padding: int, stride: int):
    """The per-pixel ``(2k-1)^2`` kernel form (any stride; used for ``stride == 1``)."""
    hh, ww = spatial(v)
    c = static_dim(v, 1, "outlook_aggregate: the channel count")
    heads = static_dim(attn, 1, "outlook_aggregate: the head count")
    k, p, s = kernel_size, padding, stride
    r, k2 = k - 1, 2 * k - 1
    left = max(0, r - p)
    # Wide-grid width: v padded by r on both sides, and room for the canvas shifts (p > r).
    wq = ww + max(2 * r, p + left)
    kern = kernel_planes(attn, hh, ww, k, p, s, wq)
    vf = phase_planes(v, heads, hh + 2 * r + 1, wq, 1, r)
    return crop(aggregate(vf, split_taps(kern, k2 * k2), k2, 1, 1, hh, wq), c, hh, ww, wq)


def portable(v, attn, kernel_size: int = 3, padding: int = 1, stride: int = 1):
    if stride > 1:
        return unfold_matmul_fold(v, attn, kernel_size, padding, stride)
    return per_pixel_kernel(v, attn, kernel_size, padding, stride)
