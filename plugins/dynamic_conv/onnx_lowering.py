"""ONNX lowering of ``dynamic_conv2d`` into standard ops (target ``ort``): a Scan over the batch.

One ``Scan`` node walks the batch axis of ``x`` and ``weight`` together; its body is an ordinary
``Conv`` of one sample with that sample's kernel (``group`` = the op's groups, never the batch), so
onnxruntime runs its own convolution kernel (MLAS im2col/GEMM tiles that stay in cache) once per
sample. The batch is the Scan's sequence length: any batch runs, and no attribute depends on it.
Every stride, padding, dilation and group count (also non-square) is a Conv attribute, and no
attribute holds a spatial size: with a dynamic height and width (``--dynamic-hw``) the body's Conv
takes each sample's size as it comes.

onnxruntime's CPU ``Conv`` is float32 only, so other dtypes (float64, float16) take
:func:`im2col_matmul`, the previous lowering: im2col by strided Slices and one batched MatMul.
(``--target trt`` does not use this lowering: TensorRT gets one plugin node per op call.)

Measured on onnxruntime 1.31 CPU (AMD EPYC, AVX2), the op alone at B=4, 64->64, 40x40, k=3, pad 1,
float32: one interleaved run, minimum over 15 rounds, 1 intra-op thread, shared machine:

============================================================  =====  =====
candidate                                                     nodes  ms
============================================================  =====  =====
im2col by 2-D strided Slices + Concat, one batched MatMul       24   10.0
  (the previous lowering; kept for other dtypes)
the same on a flat wide grid (contiguous Slices)                18   11.7
channels-last im2col, the kernel as the MatMul's right side     22   12.7
per-tap MatMul accumulation (no im2col buffer)                  33    9.2
im2col by one Gather                                             7   45.0
Winograd F(2x2, 3x3): separable transforms as small MatMuls,    37    9.1
  one 16-way batched MatMul, Space/DepthToSpace for phases
Scan over the batch, one Conv per sample (kept)                  1    6.9
(one Conv with the batch folded into ``group``, what the         1    6.8)
  official code exports with a fixed batch
(torch eager, this op)                                           -    5.8
============================================================  =====  =====

The whole ``ODConv2d(64, 64, 3, padding=1)`` exported, 2 threads, ms per call, median of
11-15 interleaved rounds on a shared 2-core machine (load average 5-7, so only the ratios between
ORT variants mean much), with the block's channel and filter attentions folded into the kernel:

===========================================  ======  ======  ======
per-sample convolution as                     B=1     B=4     B=16
===========================================  ======  ======  ======
Scan of Conv (kept)                            1.71    5.87   39.60
im2col + one batched MatMul (batched GEMM)     2.41   12.96   49.71
per-tap batched MatMuls                        4.01    7.84   70.62
===========================================  ======  ======  ======

and the op alone, Scan against a ``Loop`` whose body Gathers sample ``i`` and runs the same Conv
(fastest of 15): 1.53 / 3.05 / 32.9 ms against 1.57 / 5.71 / 41.7 ms. Scan is the fastest at every
batch size measured, so there is no per-batch choice to make. Folding the attentions into the kernel
(and combining the candidate kernels with one MatMul) took 15-25% off the whole block. What remains
is onnxruntime's im2col + SGEMM convolution for a kernel that is an input (the constant-weight NCHWc
kernels do not apply): at one thread it takes about as long as PyTorch's whole module, so the
exported ODConv is at parity with eager (``attn-export bench --blocks odconv --threads 1 --batch N``:
0.94x, 0.92x, 1.03x at batch 1, 4, 16, load average 2.4-2.8; 0.91x, 1.05x, 1.00x in an earlier run
at load 5-7), not at the 0.5x goal. With 2 threads on that shared machine PyTorch eager's OpenMP
threads stalled (35-180 ms per call), which made the ratios (0.04x-0.38x) meaningless. A direct
``Conv`` at batch 1 (an ``If`` on the batch) would save Scan's per-call overhead there, about 15% of
the op alone; not done.
"""

from __future__ import annotations

from onnx import TensorProto, helper
from onnxscript import opset18 as op

from attn_export.plugins._onnx import Size, ints, pad_hw, spatial, static_dim, tap, vec
from attn_export.plugins._taps import out_size

#: Element types onnxruntime's CPU ``Conv`` implements; others take :func:`im2col_matmul`.
CONV_TYPES = (TensorProto.FLOAT,)


def _known(size: Size) -> int | None:
    """A static size, or None (an unknown dimension in the Scan body's value_info)."""
    return size if isinstance(size, int) else None


def conv_body(elem_type: int, cin: int, h: Size, w: Size, weight_shape, ho: Size, wo: Size, conv: dict):
    """The Scan body: ``(x_b (Cin, H, W), w_b (Cout, Cin/g, kh, kw)) -> conv(x_b[None], w_b)[0]``.

    Its value_info holds the static sizes only: with a dynamic height and width (``--dynamic-hw``) the
    spatial dims are left unknown, and the body's ``Conv`` takes them from the sample it gets."""
    cout = weight_shape[0]
    axis = helper.make_tensor("axis0", TensorProto.INT64, [1], [0])
    nodes = [
        helper.make_node("Constant", [], ["axis0"], value=axis),
        helper.make_node("Unsqueeze", ["x_b", "axis0"], ["x_1"]),
        helper.make_node("Conv", ["x_1", "w_b"], ["y_1"], **conv),
        helper.make_node("Squeeze", ["y_1", "axis0"], ["y_b"]),
    ]
    return helper.make_graph(
        nodes,
        "dynamic_conv2d_sample",
        [
            helper.make_tensor_value_info("x_b", elem_type, [cin, _known(h), _known(w)]),
            helper.make_tensor_value_info("w_b", elem_type, list(weight_shape)),
        ],
        [helper.make_tensor_value_info("y_b", elem_type, [cout, _known(ho), _known(wo)])],
    )


def im2col_matmul(x, weight, stride, padding, dilation, groups: int):
    """Any dtype: im2col by strided Slices and a Concat, then one batched MatMul of each sample's
    kernel with its own columns, ``(B, g, Cout/g, Cin/g*k*k) @ (B, g, Cin/g*k*k, Ho*Wo)``."""
    h, w = spatial(x)
    cin = static_dim(x, 1, "dynamic_conv2d: the input channel count")
    cout, kh, kw = (static_dim(weight, i, "dynamic_conv2d: the kernel shape") for i in (1, 3, 4))
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
    cols = op.Reshape(cols, vec([0, groups, (cin // groups) * kh * kw, ho * wo]))
    wm = op.Reshape(weight, ints([0, groups, cout // groups, (cin // groups) * kh * kw]))
    return op.Reshape(op.MatMul(wm, cols), vec([0, cout, ho, wo]))


def portable(x, weight, stride, padding, dilation, groups: int):
    if int(x.dtype) not in CONV_TYPES:
        return im2col_matmul(x, weight, stride, padding, dilation, groups)
    _, _, h, w = x.shape
    h, w = (d if isinstance(d, int) else None for d in (h, w))  # the body's value_info only
    cin = static_dim(x, 1, "dynamic_conv2d: the input channel count")
    cout, kh, kw = (static_dim(weight, i, "dynamic_conv2d: the kernel shape") for i in (1, 3, 4))
    ho = None if h is None else out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = None if w is None else out_size(w, kw, stride[1], padding[1], dilation[1])
    conv = {
        "group": int(groups),
        "kernel_shape": [int(kh), int(kw)],
        "strides": [int(s) for s in stride],
        "pads": [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
        "dilations": [int(d) for d in dilation],
    }
    body = conv_body(int(x.dtype), cin, h, w, (cout, cin // groups, kh, kw), ho, wo, conv)
    return op.Scan(x, weight, body=body, num_scan_inputs=2)
