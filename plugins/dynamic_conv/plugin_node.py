"""``dynamic_conv2d`` as one TensorRT plugin node (target ``trt``): ``trt.plugins::AttnExportDynamicConv2d``.

Inputs ``x`` (B, Cin, H, W) and ``weight`` (B, Cout, Cin/groups, kH, kW); output (B, Cout, Ho, Wo).
Attributes: ``plugin_namespace``, ``plugin_version``, the int lists ``stride``, ``padding``,
``dilation`` (two each: rows, columns) and the int ``groups``.
"""

from __future__ import annotations

from attn_export.plugins._plugin_node import plugin_attrs, plugin_op
from attn_export.plugins.registry import BY_OP

SPEC = BY_OP["dynamic_conv2d"]
ATTRIBUTES = SPEC.attribute_names
OP = plugin_op(SPEC)


def plugin(x, weight, stride, padding, dilation, groups: int):
    return OP(x, weight, **plugin_attrs(SPEC, stride, padding, dilation, groups))
