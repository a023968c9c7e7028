"""Names shared by the TensorRT plugin nodes (ONNX side) and the TensorRT plugins (engine side).

TensorRT's ONNX parser hands a node it does not know to the plugin registry, looking it up by the
node's ``op_type`` (the plugin name), its ``plugin_namespace`` attribute and its optional
``plugin_version`` attribute; the other attributes become the plugin's fields. The names must not
collide with ONNX op names (the parser checks built-in ops first), hence the ``AttnExport`` prefix.
"""

#: The namespace every attn-export plugin is registered under (``tensorrt.plugin`` ids are "ns::name").
NAMESPACE = "attn_export"
#: Plugin version, written as the node's ``plugin_version`` attribute.
VERSION = "1"
#: ONNX domain of the plugin nodes (the convention of TensorRT tooling for plugin nodes).
DOMAIN = "trt.plugins"

INVOLUTION = "AttnExportInvolution2d"
DYNAMIC_CONV = "AttnExportDynamicConv2d"
OUTLOOK = "AttnExportOutlookAggregate"

#: op name -> plugin name
PLUGINS = {
    "involution2d": INVOLUTION,
    "dynamic_conv2d": DYNAMIC_CONV,
    "outlook_aggregate": OUTLOOK,
}


def plugin_id(name: str) -> str:
    """The ``tensorrt.plugin`` id of a plugin: ``"namespace::name"``."""
    return f"{NAMESPACE}::{name}"
