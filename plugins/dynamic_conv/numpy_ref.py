"""``dynamic_conv2d`` in numpy, and the ``AttnExportDynamicConv2d`` node for ``onnx.reference``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx.reference.op_run import OpRun

from attn_export.plugins._numpy import check_plugin, float_types, out_size, pad_hw, window
from attn_export.plugins._trt_names import DOMAIN, DYNAMIC_CONV


def dynamic_conv2d(
    x: np.ndarray,
    weight: np.ndarray,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> np.ndarray:
    """``x`` (B, Cin, H, W), ``weight`` (B, Cout, Cin/groups, kH, kW) -> (B, Cout, Ho, Wo).

    One batched ``(Cout/g, Cin/g) @ (Cin/g, Ho*Wo)`` matmul per tap, per sample and group.
    """
    x, weight = np.asarray(x), np.asarray(weight)
    dtype, acc = float_types("dynamic_conv2d", x, weight)
    (sh, sw), (ph, pw), (dh, dw) = (tuple(int(v) for v in a) for a in (stride, padding, dilation))
    g = int(groups)
    if x.ndim != 4 or weight.ndim != 5:
        raise ValueError(f"dynamic_conv2d: need x 4-D and weight 5-D, got {x.shape} and {weight.shape}")
    b, cin, h, w = x.shape
    cout, kh, kw = weight.shape[1], weight.shape[3], weight.shape[4]
    if g < 1 or cin % g or cout % g or weight.shape[:3] != (b, cout, cin // g):
        raise ValueError(f"dynamic_conv2d: weight {weight.shape} does not fit x {x.shape} with groups={g}")
    ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    xp = pad_hw(x.astype(acc, copy=False), ph, pw).reshape(b, g, cin // g, h + 2 * ph, w + 2 * pw)
    wt = weight.astype(acc, copy=False).reshape(b, g, cout // g, cin // g, kh, kw)
    out = np.zeros((b, g, cout // g, ho * wo), dtype=acc)
    for a in range(kh):
        for bb in range(kw):
            cols = window(xp, a * dh, bb * dw, (ho, wo), (sh, sw)).reshape(b, g, cin // g, ho * wo)
            out += wt[..., a, bb] @ cols
    return out.reshape(b, cout, ho, wo).astype(dtype, copy=False)


class AttnExportDynamicConv2d(OpRun):
    """The plugin node, for ``onnx.reference.ReferenceEvaluator(model, new_ops=[...])``."""

    op_domain = DOMAIN

    def _run(
        self, x, w, plugin_namespace=None, plugin_version=None, stride=None, padding=None, dilation=None, groups=1
    ):
        check_plugin(DYNAMIC_CONV, plugin_namespace, plugin_version)
        stride = (1, 1) if stride is None else stride
        padding = (0, 0) if padding is None else padding
        dilation = (1, 1) if dilation is None else dilation
        return (dynamic_conv2d(x, w, stride, padding, dilation, groups),)
