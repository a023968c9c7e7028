"""Building blocks of the TensorRT plugin nodes (target ``trt``).

Each op's ``plugin_node.plugin`` emits one node that TensorRT's ONNX parser hands to the plugin
registry: ``op_type`` is the plugin name, the domain is :data:`~attn_export.plugins._trt_names.DOMAIN`,
and the attributes are ``plugin_namespace``, ``plugin_version`` and the op's own attributes by name.

The torch.onnx (dynamo) exporter records an onnxscript op from its ``OpSchema`` (it needs one to tell
inputs from attributes), so :func:`plugin_op` builds a schema for the plugin. The schema is only
handed to that op, never registered with ``onnx.defs``: ONNX shape inference and the checker then
skip the node as an op of an unknown domain (its output type and shape come from the op's fake
kernel through the exporter's ``value_info``), and ``onnx.defs.has`` keeps answering False.
"""

from __future__ import annotations

import functools

from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

from attn_export.plugins._trt_names import DOMAIN, NAMESPACE, VERSION
from attn_export.plugins.registry import BY_PLUGIN, INT, INTS, OpSpec

#: ``OpSchema`` attribute type of each attribute kind of the registry.
_ATTR_TYPES = {INT: OpSchema.AttrType.INT, INTS: OpSchema.AttrType.INTS}

#: The element types the plugins take (both inputs and the output share one).
TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")

#: The opset the plugin nodes are recorded in (``opset_import`` gets ``DOMAIN: 1``).
PLUGIN_OPSET = Opset(DOMAIN, 1)


@functools.cache
def _plugin_op(name: str, inputs: tuple[str, ...], attributes: tuple[tuple[str, OpSchema.AttrType], ...]) -> Op:
    attrs = [
        OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, f"plugin namespace ({NAMESPACE!r})"),
        OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, f"plugin version ({VERSION!r})"),
        *(OpSchema.Attribute(attr, kind, attr) for attr, kind in attributes),
    ]
    schema = OpSchema(
        name,
        DOMAIN,
        PLUGIN_OPSET.version,
        f"TensorRT plugin {NAMESPACE}::{name}",
        inputs=[OpSchema.FormalParameter(i, "T") for i in inputs],
        outputs=[OpSchema.FormalParameter("y", "T")],
        type_constraints=[("T", list(TYPES), "float types")],
        attributes=attrs,
    )
    return Op(PLUGIN_OPSET, name, schema)


def plugin_op(spec: OpSpec) -> Op:
    """The onnxscript op that records one ``DOMAIN::<plugin>`` node with the spec's inputs and attributes."""
    return _plugin_op(spec.plugin, spec.inputs, tuple((name, _ATTR_TYPES[kind]) for name, kind in spec.attributes))


def plugin_attrs(spec: OpSpec, *values) -> dict:
    """``plugin_namespace``, ``plugin_version`` and the op's attributes (``values``, in the spec's order)
    as plain ints / lists of ints."""
    if len(values) != len(spec.attributes):
        raise TypeError(f"{spec.plugin}: expected {len(spec.attributes)} attribute values, got {len(values)}")
    out: dict = {"plugin_namespace": NAMESPACE, "plugin_version": VERSION}
    for (key, kind), value in zip(spec.attributes, values, strict=True):
        out[key] = [int(v) for v in value] if kind == INTS else int(value)
    return out


def attribute_order(name: str) -> tuple[str, ...]:
    """The attributes of plugin ``name`` in the node's order: ``plugin_namespace``, ``plugin_version``,
    then the op's own in the order of the registered TensorRT function's signature.

    The invariant to keep: **the node's order equals the signature's.** TensorRT itself does not need
    the node's order: its ONNX parser (onnx-tensorrt, ``loadFields``) walks the plugin creator's field
    list, which ``tensorrt.plugin`` builds from the registered function's parameters, in their order, and
    looks each field up in the node by name (ints arrive as int32 fields and are cast back to ``int``,
    int lists as int32 arrays). The AOT plugin then passes the fields to ``aot_impl`` positionally, in
    that order. Keeping the node in the same order makes the graph read like the signature; both take
    the order of :attr:`OpSpec.attributes <attn_export.plugins.registry.OpSpec.attributes>`.
    """
    return ("plugin_namespace", "plugin_version", *BY_PLUGIN[name].attribute_names)
