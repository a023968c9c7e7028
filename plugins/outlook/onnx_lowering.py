"""ONNX lowering of ``outlook_aggregate`` into standard ops (target ``ort``), without ``Col2Im``.

Unfold by ``k*k`` strided slices and a Concat; the per-window mixing is one batched MatMul in the
official layout; the fold is a ``ConvTranspose`` with a fixed one-hot kernel (``group = C``), which
places each tap's values at its offset and sums the overlaps: exactly ``F.fold``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxscript import opset18 as op

from attn_export.plugins._onnx import ints, pad_hw, tap
from attn_export.plugins._taps import out_size


def one_hot_taps(channels: int, kernel_size: int, dtype: np.dtype) -> np.ndarray:
    """(C*k*k, 1, k, k) weights: output channel ``c*k*k + t`` picks tap ``t`` of channel ``c``."""
    kk = kernel_size * kernel_size
    eye = np.eye(kk, dtype=dtype).reshape(kk, 1, kernel_size, kernel_size)
    return np.tile(eye, (channels, 1, 1, 1))


def portable(v, attn, kernel_size: int = 3, padding: int = 1, stride: int = 1):
    _, c, hh, ww = v.shape
    heads = attn.shape[1]
    k, p, s = kernel_size, padding, stride
    kk = k * k
    h, w = out_size(hh, k, s, p, 1), out_size(ww, k, s, p, 1)
    vp = pad_hw(v, p, p)
    taps = [op.Unsqueeze(tap(vp, (2, 3), a, b, (h, w), (s, s)), ints([2])) for a in range(k) for b in range(k)]
    cols = taps[0] if kk == 1 else op.Concat(*taps, axis=2)  # B, C, kk, h, w
    windows = op.Transpose(op.Reshape(cols, ints([0, heads, c // heads, kk, h * w])), perm=[0, 1, 4, 3, 2])
    mixed = op.Transpose(op.MatMul(attn, windows), perm=[0, 1, 4, 3, 2])  # B, heads, C/heads, kk, L
    mixed = op.Reshape(mixed, ints([0, c * kk, h, w]))
    onehot = one_hot_taps(c, k, v.dtype.numpy())
    extra = [hh + 2 * p - k - (h - 1) * s, ww + 2 * p - k - (w - 1) * s]
    return op.ConvTranspose(
        mixed,
        op.Constant(value=onnx.numpy_helper.from_array(onehot)),
        group=c,
        kernel_shape=[k, k],
        strides=[s, s],
        pads=[p, p, p, p],
        output_padding=extra,
    )
