"""ONNX lowering of ``involution2d`` into standard ops (target ``ort``).

Measured on onnxruntime CPU (B=4, C=64, 40x40, k=7, G=4), a tap-by-tap graph (49 x Slice, Mul,
Add) and the one-hot-Conv im2col (49-fold buffer, 1.2 GMAC) were slower than this form: the input is
unfolded along the columns only (k slices + one Concat, a k-fold buffer instead of k*k), then each
kernel row is one broadcast Mul and a ReduceSum over the k column taps. About 4 + 5k nodes.
"""

from __future__ import annotations

from onnxscript import opset18 as op

from attn_export.plugins._onnx import ints, pad_hw, strided
from attn_export.plugins._taps import out_size


def portable(x, weight, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
    _, c, h, w = x.shape
    groups = weight.shape[1]
    k, s, p, d = kernel_size, stride, padding, dilation
    ho, wo = out_size(h, k, s, p, d), out_size(w, k, s, p, d)
    xg = op.Reshape(pad_hw(x, p, p), ints([0, groups, c // groups, 1, h + 2 * p, w + 2 * p]))
    cols = [strided(xg, 5, b * d, wo, s) for b in range(k)]
    cols = cols[0] if k == 1 else op.Concat(*cols, axis=3)  # B, G, cg, k, Hp, wo
    w6 = op.Unsqueeze(weight, ints([2]))  # B, G, 1, k*k, ho, wo
    acc = None
    for a in range(k):
        rows = strided(cols, 4, a * d, ho, s)  # B, G, cg, k, ho, wo
        wa = op.Slice(w6, ints([a * k]), ints([a * k + k]), ints([3]))
        term = op.ReduceSum(op.Mul(rows, wa), ints([3]), keepdims=0)
        acc = term if acc is None else op.Add(acc, term)
    return op.Reshape(acc, ints([0, c, ho, wo]))
