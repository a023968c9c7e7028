"""``involution2d`` as one TensorRT plugin node (target ``trt``): ``trt.plugins::AttnExportInvolution2d``.

Inputs ``x`` (B, C, H, W) and ``weight`` (B, G, k*k, Ho, Wo); output (B, C, Ho, Wo). Attributes:
``plugin_namespace``, ``plugin_version`` and the ints ``kernel_size``, ``stride``, ``padding``,
``dilation``.
"""

from __future__ import annotations

from attn_export.plugins._plugin_node import plugin_attrs, plugin_op
from attn_export.plugins.registry import BY_OP

SPEC = BY_OP["involution2d"]
ATTRIBUTES = SPEC.attribute_names
OP = plugin_op(SPEC)


def plugin(x, weight, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
    return OP(x, weight, **plugin_attrs(SPEC, kernel_size, stride, padding, dilation))
