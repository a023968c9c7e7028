"""Names shared by the TensorRT plugin nodes (ONNX side) and the TensorRT plugins (engine side).

TensorRT's ONNX parser hands a node it does not know to the plugin registry, looking it up by the
node's ``op_type`` (the plugin name), its ``plugin_namespace`` attribute and its optional
``plugin_version`` attribute; the other attributes become the plugin's fields. The names must not
collide with ONNX op names (the parser checks built-in ops first), hence the ``AttnExport`` prefix.
The plugin names themselves come from :mod:`attn_export.plugins.registry`.
"""

from attn_export.plugins.registry import BY_OP, OPS

#: The namespace every attn-export plugin is registered under (``tensorrt.plugin`` ids are "ns::name").
NAMESPACE = "attn_export"
#: Plugin version, written as the node's ``plugin_version`` attribute.
VERSION = "1"
#: ONNX domain of the plugin nodes (the convention of TensorRT tooling for plugin nodes).
DOMAIN = "trt.plugins"

#: op name -> plugin name
PLUGINS = {spec.op: spec.plugin for spec in OPS}

INVOLUTION = BY_OP["involution2d"].plugin
DYNAMIC_CONV = BY_OP["dynamic_conv2d"].plugin
OUTLOOK = BY_OP["outlook_aggregate"].plugin


def plugin_id(name: str) -> str:
    """The ``tensorrt.plugin`` id of a plugin: ``"namespace::name"``."""
    return f"{NAMESPACE}::{name}"
