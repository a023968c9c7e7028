"""``outlook_aggregate`` as one TensorRT plugin node (target ``trt``): ``trt.plugins::AttnExportOutlookAggregate``.

Inputs ``v`` (B, C, H, W) and ``attn`` (B, heads, h*w, k*k, k*k); output (B, C, H, W). Attributes:
``plugin_namespace``, ``plugin_version`` and the ints ``kernel_size``, ``padding``, ``stride``.
"""

from __future__ import annotations

from attn_export.plugins._plugin_node import plugin_attrs, plugin_op
from attn_export.plugins.registry import BY_OP

SPEC = BY_OP["outlook_aggregate"]
ATTRIBUTES = SPEC.attribute_names
OP = plugin_op(SPEC)


def plugin(v, attn, kernel_size: int = 3, padding: int = 1, stride: int = 1):
    return OP(v, attn, **plugin_attrs(SPEC, kernel_size, padding, stride))
