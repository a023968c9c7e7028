"""``involution2d`` in numpy, and the ``AttnExportInvolution2d`` node for ``onnx.reference``."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from attn_export.plugins._numpy import check_plugin, float_types, out_size, pad_hw, window
from attn_export.plugins._trt_names import DOMAIN, INVOLUTION


def involution2d(
    x: np.ndarray, weight: np.ndarray, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> np.ndarray:
    """``x`` (B, C, H, W), ``weight`` (B, G, k*k, Ho, Wo) -> (B, C, Ho, Wo); a loop over the k*k taps."""
    x, weight = np.asarray(x), np.asarray(weight)
    dtype, acc = float_types("involution2d", x, weight)
    k, s, p, d = int(kernel_size), int(stride), int(padding), int(dilation)
    if x.ndim != 4 or weight.ndim != 5:
        raise ValueError(f"involution2d: need x 4-D and weight 5-D, got {x.shape} and {weight.shape}")
    b, c, h, w = x.shape
    g = weight.shape[1]
    ho, wo = out_size(h, k, s, p, d), out_size(w, k, s, p, d)
    if c % g or weight.shape != (b, g, k * k, ho, wo):
        raise ValueError(f"involution2d: weight {weight.shape} does not fit x {x.shape} (k={k}, s={s}, p={p}, d={d})")
    xp = pad_hw(x.astype(acc, copy=False), p, p).reshape(b, g, c // g, h + 2 * p, w + 2 * p)
    wt = weight.astype(acc, copy=False)
    out = np.zeros((b, g, c // g, ho, wo), dtype=acc)
    for t in range(k * k):
        a, bb = divmod(t, k)
        out += window(xp, a * d, bb * d, (ho, wo), (s, s)) * wt[:, :, t, None]
    return out.reshape(b, c, ho, wo).astype(dtype, copy=False)


class AttnExportInvolution2d(OpRun):
    """The plugin node, for ``onnx.reference.ReferenceEvaluator(model, new_ops=[...])``."""

    op_domain = DOMAIN

    def _run(self, x, w, plugin_namespace=None, plugin_version=None, kernel_size=None, stride=1, padding=0, dilation=1):
        check_plugin(INVOLUTION, plugin_namespace, plugin_version)
        if kernel_size is None:
            raise ValueError(f"{INVOLUTION}: the kernel_size attribute is required")
        return (involution2d(x, w, kernel_size, stride, padding, dilation),)
