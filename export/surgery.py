"""Graph surgery on the exported ONNX: keep the model's outputs, fold constants, name the batch axis,
check the result, and (target ``trt``) check the TensorRT plugin nodes."""

from __future__ import annotations

import collections

from attn_export.export.errors import ExportError


def clean_graph(proto, output_names: list[str], keep: int, target: str = "ort"):
    """Keep the first ``keep`` outputs, fold constants, drop dead nodes, sort, name the batch axis.

    The same checks for both targets: strict ONNX shape inference and the full checker. The plugin
    nodes of target ``trt`` are in a domain ONNX has no schemas for, so both pass over them; their
    output types and shapes are the exporter's ``value_info`` (from the ops' fake kernels), which
    :func:`check_plugin_nodes` requires to be there.
    """
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # fold_constants runs onnxruntime; its notes are noise here
    graph = gs.import_onnx(proto)
    graph.outputs = graph.outputs[:keep]
    for t, name in zip(graph.outputs, output_names, strict=True):
        t.name = name
    graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    for t in [*graph.inputs, *graph.outputs]:
        if t.shape:
            t.shape = ["batch", *t.shape[1:]]
    model = gs.export_onnx(graph)
    del model.opset_import[:]
    model.opset_import.extend(proto.opset_import)
    model.ir_version = min(proto.ir_version, 10)  # onnxruntime reads IR <= 10 everywhere we ship
    model.producer_name = "attn-export"
    from attn_export import __version__

    model.producer_version = __version__
    if target == "trt":
        _order_plugin_attributes(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    if target == "trt":
        check_plugin_nodes(model)
    return model


def _order_plugin_attributes(model) -> None:
    """Put each plugin node's attributes in the plugin's order (the exporter records them in its own)."""
    from attn_export.plugins._plugin_node import attribute_order
    from attn_export.plugins._trt_names import DOMAIN, PLUGINS

    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in PLUGINS.values():
            rank = {name: i for i, name in enumerate(attribute_order(node.op_type))}
            attrs = [type(a).FromString(a.SerializeToString()) for a in node.attribute]  # copies, then reorder
            attrs.sort(key=lambda a: (rank.get(a.name, len(rank)), a.name))
            del node.attribute[:]
            node.attribute.extend(attrs)


def check_plugin_nodes(model) -> dict[str, int]:
    """``{plugin name: count}`` of a ``trt`` graph, after checking each plugin node's convention.

    A plugin node has ``op_type`` = a plugin name, domain ``DOMAIN``, ``plugin_namespace`` and
    ``plugin_version`` attributes, and outputs of known element type and rank; no other domain appears.
    """
    from onnx import helper

    from attn_export.plugins._trt_names import DOMAIN, NAMESPACE, PLUGINS, VERSION

    typed = {
        v.name: v.type.tensor_type
        for v in [*model.graph.value_info, *model.graph.output]
        if v.type.tensor_type.elem_type and v.type.tensor_type.HasField("shape")
    }
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            continue
        where = f"node {node.name or node.output[0]!r} ({node.domain}::{node.op_type})"
        if node.domain != DOMAIN or node.op_type not in PLUGINS.values():
            raise ExportError(f"target trt: {where} is neither standard ONNX nor an attn-export plugin node")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("plugin_namespace") != NAMESPACE.encode() or attrs.get("plugin_version") != VERSION.encode():
            raise ExportError(f"target trt: {where} lacks plugin_namespace={NAMESPACE!r}, plugin_version={VERSION!r}")
        untyped = [o for o in node.output if o not in typed]
        if untyped:
            raise ExportError(f"target trt: the exporter gave no type and shape for {untyped} of {where}")
        counts[node.op_type] += 1
    return dict(counts)
