"""``involution2d`` as one TensorRT plugin node (target ``trt``): ``trt.plugins::AttnExportInvolution2d``.

Inputs ``x`` (B, C, H, W) and ``weight`` (B, G, k*k, Ho, Wo); output (B, C, Ho, Wo). Attributes:
``plugin_namespace``, ``plugin_version`` and the ints ``kernel_size``, ``stride``, ``padding``,
``dilation``.
"""

from __future__ import annotations

from attn_export.plugins._plugin_node import INT, plugin_attrs, plugin_op
from attn_export.plugins._trt_names import INVOLUTION

ATTRIBUTES = {"kernel_size": INT, "stride": INT, "padding": INT, "dilation": INT}
OP = plugin_op(INVOLUTION, ("x", "weight"), ATTRIBUTES)


def plugin(x, weight, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
    attrs = plugin_attrs(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    return OP(x, weight, **attrs)
