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
    graph.fold_constants()
    if target == "ort":
        fusable_gelu(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
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


def _scalar(tensor, value: float) -> bool:
    """``tensor`` is a constant holding the single number ``value``."""
    import numpy as np
    import onnx_graphsurgeon as gs

    return isinstance(tensor, gs.Constant) and tensor.values.size == 1 and bool(np.isclose(tensor.values, value))


def fusable_gelu(graph) -> int:
    """Reorder the exact GELU of ``torch.onnx`` so that onnxruntime fuses it; the number rewritten.

    torch writes ``x * ((erf(x / sqrt2) + 1) * 0.5)``, a form onnxruntime's GeluFusion does not match
    (five element-wise passes over the MLP's widest tensor, and the Linear's bias Add before them).
    ``(x * (erf(x / sqrt2) + 1)) * 0.5`` is the same number (a product with 0.5 is exact) and fuses into
    one ``Gelu``, and with the bias Add before it into one ``BiasGelu``."""
    outputs = {t.name for t in graph.outputs}
    done = 0
    for erf in [n for n in graph.nodes if n.op == "Erf"]:
        div = erf.inputs[0].inputs[0] if erf.inputs[0].inputs else None
        if div is None or div.op != "Div" or not _scalar(div.inputs[1], 2**0.5):
            continue
        x = div.inputs[0]
        add = erf.outputs[0].outputs[0] if len(erf.outputs[0].outputs) == 1 else None
        if add is None or add.op != "Add" or not any(_scalar(t, 1.0) for t in add.inputs):
            continue
        half = add.outputs[0].outputs[0] if len(add.outputs[0].outputs) == 1 else None
        if half is None or half.op != "Mul" or half.outputs[0].name in outputs:
            continue
        c = [t for t in half.inputs if t is not add.outputs[0]]
        if len(c) != 1 or not _scalar(c[0], 0.5) or len(half.outputs[0].outputs) != 1:
            continue
        last = half.outputs[0].outputs[0]
        if last.op != "Mul" or [t.name for t in last.inputs if t is not half.outputs[0]] != [x.name]:
            continue
        # half: x * (erf + 1); last: that * 0.5 (same output tensor as before)
        half.inputs = [x, add.outputs[0]]
        last.inputs = [half.outputs[0], c[0]]
        done += 1
    return done


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
