"""``outlook_aggregate`` in numpy, and the ``AttnExportOutlookAggregate`` node for ``onnx.reference``."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from attn_export.plugins._numpy import check_plugin, float_types, out_size, pad_hw, window
from attn_export.plugins._trt_names import DOMAIN, OUTLOOK


def outlook_aggregate(
    v: np.ndarray, attn: np.ndarray, kernel_size: int = 3, padding: int = 1, stride: int = 1
) -> np.ndarray:
    """``v`` (B, C, H, W), ``attn`` (B, heads, h*w, k*k, k*k) -> (B, C, H, W): fold(attn @ unfold(v)).

    Unfold and fold loop over the k*k taps; the mixing is one batched matmul.
    """
    v, attn = np.asarray(v), np.asarray(attn)
    dtype, acc = float_types("outlook_aggregate", v, attn)
    k, p, s = int(kernel_size), int(padding), int(stride)
    if v.ndim != 4 or attn.ndim != 5:
        raise ValueError(f"outlook_aggregate: need v 4-D and attn 5-D, got {v.shape} and {attn.shape}")
    b, c, hh, ww = v.shape
    heads, kk = attn.shape[1], k * k
    h, w = out_size(hh, k, s, p, 1), out_size(ww, k, s, p, 1)
    if heads < 1 or c % heads or attn.shape != (b, heads, h * w, kk, kk):
        raise ValueError(f"outlook_aggregate: attn {attn.shape} does not fit v {v.shape} (k={k}, p={p}, s={s})")
    ch = c // heads
    vp = pad_hw(v.astype(acc, copy=False), p, p).reshape(b, heads, ch, hh + 2 * p, ww + 2 * p)
    taps = np.stack([window(vp, a, bb, (h, w), (s, s)) for a in range(k) for bb in range(k)], axis=3)
    windows = taps.reshape(b, heads, ch, kk, h * w).transpose(0, 1, 4, 3, 2)  # B, heads, L, kk, ch
    mixed = attn.astype(acc, copy=False) @ windows  # B, heads, L, kk, ch
    mixed = mixed.transpose(0, 1, 4, 3, 2).reshape(b, heads, ch, kk, h, w)
    out = np.zeros_like(vp)
    for t in range(kk):
        a, bb = divmod(t, k)
        window(out, a, bb, (h, w), (s, s))[...] += mixed[:, :, :, t]
    return out[..., p : p + hh, p : p + ww].reshape(b, c, hh, ww).astype(dtype, copy=False)


class AttnExportOutlookAggregate(OpRun):
    """The plugin node, for ``onnx.reference.ReferenceEvaluator(model, new_ops=[...])``."""

    op_domain = DOMAIN

    def _run(self, v, attn, plugin_namespace=None, plugin_version=None, kernel_size=3, padding=1, stride=1):
        check_plugin(OUTLOOK, plugin_namespace, plugin_version)
        return (outlook_aggregate(v, attn, kernel_size, padding, stride),)
