"""``dynamic_conv2d`` as one TensorRT plugin node (target ``trt``): ``trt.plugins::AttnExportDynamicConv2d``.

Inputs ``x`` (B, Cin, H, W) and ``weight`` (B, Cout, Cin/groups, kH, kW); output (B, Cout, Ho, Wo).
Attributes: ``plugin_namespace``, ``plugin_version``, the int lists ``stride``, ``padding``,
``dilation`` (two each: rows, columns) and the int ``groups``.
"""

from __future__ import annotations

from attn_export.plugins._plugin_node import INT, INTS, plugin_attrs, plugin_op
from attn_export.plugins._trt_names import DYNAMIC_CONV

ATTRIBUTES = {"stride": INTS, "padding": INTS, "dilation": INTS, "groups": INT}
OP = plugin_op(DYNAMIC_CONV, ("x", "weight"), ATTRIBUTES)


def plugin(x, weight, stride, padding, dilation, groups: int):
    attrs = plugin_attrs(stride=list(stride), padding=list(padding), dilation=list(dilation), groups=groups)
    return OP(x, weight, **attrs)
