"""ONNX lowering of ``dynamic_conv2d`` into standard ops (target ``ort``).

The batch stays a real axis: im2col by strided slices (one per tap) and a Concat, then one batched
MatMul of each sample's kernel with its own columns, grouped as ``(B, groups, Cout/g, Cin/g*k*k)
@ (B, groups, Cin/g*k*k, L)``. No attribute depends on the batch. Measured on onnxruntime CPU
(B=4, 64->64, 40x40, k=3): this (24 nodes) and a per-tap MatMul accumulation were both about 6 ms;
im2col by a one-hot depthwise Conv was 4x slower; an ONNX Loop over the batch with a Conv is
not used (its weight changes per iteration, and TensorRT handles Loop poorly).
"""

from __future__ import annotations

from onnxscript import opset18 as op

from attn_export.plugins._onnx import ints, pad_hw, tap
from attn_export.plugins._taps import out_size


def portable(x, weight, stride, padding, dilation, groups: int):
    _, cin, h, w = x.shape
    cout, kh, kw = weight.shape[1], weight.shape[3], weight.shape[4]
    ho = out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = out_size(w, kw, stride[1], padding[1], dilation[1])
    if kh == kw == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        cols = x
    else:
        xp = pad_hw(x, padding[0], padding[1])
        taps = [
            op.Unsqueeze(tap(xp, (2, 3), a * dilation[0], b * dilation[1], (ho, wo), tuple(stride)), ints([2]))
            for a in range(kh)
            for b in range(kw)
        ]
        cols = taps[0] if len(taps) == 1 else op.Concat(*taps, axis=2)  # B, Cin, k*k, ho, wo
    cols = op.Reshape(cols, ints([0, groups, (cin // groups) * kh * kw, ho * wo]))
    wm = op.Reshape(weight, ints([0, groups, cout // groups, (cin // groups) * kh * kw]))
    return op.Reshape(op.MatMul(wm, cols), ints([0, cout, ho, wo]))
