"""The plugin nodes of the ``trt`` target off TensorRT: numpy implementations of the ops, for
``onnx.reference`` and for onnxruntime.

``ReferenceEvaluator(model, new_ops=reference_ops())`` runs a ``--target trt`` graph on any machine
(no GPU, no TensorRT): every standard node by ONNX's reference implementation, every plugin node by
the numpy code in ``plugins/<op>/numpy_ref.py``. It is slow (its Conv, MatMul and friends are numpy
loops written for clarity).

:func:`ort_plugin_graph` and :func:`register_ort_kernels` run the same graph on onnxruntime instead:
the standard nodes by onnxruntime's kernels, each plugin node by the same numpy code, registered as an
onnxruntime-extensions Python op. The plugin node moves to that library's domain and its attributes
travel as one JSON string attribute (its Python ops take scalar attributes only; ``dynamic_conv2d``
has int lists), decoded back into the attributes ``onnx.reference`` passes, so both paths call one
function with the same arguments.
"""

from __future__ import annotations

import functools
import importlib
import json

from attn_export.plugins._trt_names import DOMAIN
from attn_export.plugins.registry import BY_PLUGIN, OPS

#: The domain of onnxruntime-extensions' Python custom ops.
ORT_PYOP_DOMAIN = "ai.onnx.contrib"
#: The one string attribute of a plugin node rewritten for onnxruntime: the node's attributes as JSON.
ORT_ATTRS = "attrs"


def reference_ops() -> list:
    """The ``OpRun`` classes of the plugin nodes (class name = plugin name, domain ``DOMAIN``)."""
    ops = [getattr(importlib.import_module(spec.numpy_ref), spec.plugin) for spec in OPS]
    if any(cls.__name__ != spec.plugin or cls.op_domain != DOMAIN for cls, spec in zip(ops, OPS, strict=True)):
        names = [cls.__name__ for cls in ops]
        raise RuntimeError(f"reference ops {names} do not match the plugin names {[s.plugin for s in OPS]}")
    return ops


def _kernel(cls):
    """``(*inputs, attrs=JSON) -> output``: the ``OpRun`` class's own ``_run`` (it keeps no state)."""

    def kernel(*inputs, **kwargs):
        attrs = json.loads(kwargs.get(ORT_ATTRS) or "{}")
        return cls._run(None, *inputs, **attrs)[0]  # _run uses no instance state; self is unused

    kernel.__name__ = cls.__name__
    return kernel


@functools.cache
def register_ort_kernels() -> str:
    """Register each plugin's numpy reference as an onnxruntime-extensions Python op (float32 inputs and
    output, op type = plugin name, domain :data:`ORT_PYOP_DOMAIN`), once per process; returns the custom-op
    library to pass to ``SessionOptions.register_custom_ops_library``."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    for cls, spec in zip(reference_ops(), OPS, strict=True):
        onnx_op(
            op_type=spec.plugin,
            inputs=[PyCustomOpDef.dt_float] * len(spec.inputs),
            outputs=[PyCustomOpDef.dt_float],
            attrs={ORT_ATTRS: PyCustomOpDef.dt_string},
        )(_kernel(cls))
    return get_library_path()


def _attr_value(attr):
    from onnx import helper

    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def ort_plugin_graph(model):
    """A copy of ``model`` whose plugin nodes are onnxruntime-extensions Python ops (see the module doc);
    every other node, name and value is unchanged. Raises ``ValueError`` on a plugin node whose attributes
    are not plain ints, int lists or strings."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in out.graph.node if n.domain == DOMAIN and n.op_type in BY_PLUGIN]
    for node in nodes:
        attrs = {}
        for a in node.attribute:
            value = _attr_value(a)
            if not isinstance(value, (int, str, list)):
                raise ValueError(
                    f"plugin node {node.name!r} ({node.op_type}): attribute {a.name} is not an int or a string"
                )
            attrs[a.name] = value
        del node.attribute[:]
        node.attribute.append(helper.make_attribute(ORT_ATTRS, json.dumps(attrs)))
        node.domain = ORT_PYOP_DOMAIN
    if nodes and not any(o.domain == ORT_PYOP_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(ORT_PYOP_DOMAIN, 1))
    return out
