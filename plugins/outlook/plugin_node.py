"""``outlook_aggregate`` as one TensorRT plugin node (target ``trt``): ``trt.plugins::AttnExportOutlookAggregate``.

Inputs ``v`` (B, C, H, W) and ``attn`` (B, heads, h*w, k*k, k*k); output (B, C, H, W). Attributes:
``plugin_namespace``, ``plugin_version`` and the ints ``kernel_size``, ``padding``, ``stride``.
"""

from __future__ import annotations

from attn_export.plugins._plugin_node import INT, plugin_attrs, plugin_op
from attn_export.plugins._trt_names import OUTLOOK

ATTRIBUTES = {"kernel_size": INT, "padding": INT, "stride": INT}
OP = plugin_op(OUTLOOK, ("v", "attn"), ATTRIBUTES)


def plugin(v, attn, kernel_size: int = 3, padding: int = 1, stride: int = 1):
    attrs = plugin_attrs(kernel_size=kernel_size, padding=padding, stride=stride)
    return OP(v, attn, **attrs)
