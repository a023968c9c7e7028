"""The dynamic-kernel ops, each a ``torch.library`` custom op that owns all of its backends.

==================  ========================================  ===========================
op                  what it computes                          used by
==================  ========================================  ===========================
involution2d        per-pixel kernel shared by a channel group Involution2d
dynamic_conv2d      per-sample convolution kernel             ODConv2d
outlook_aggregate   fold(attn @ unfold(v))                    OutlookAttention
==================  ========================================  ===========================

Importing this package registers the ops with torch (as torchvision does for its ops); it never
imports Triton or TensorRT. The CUDA kernels import Triton when first called.
"""

from __future__ import annotations

import importlib

from attn_export.plugins._kernels import use_cuda_kernel
from attn_export.plugins.dynamic_conv import dynamic_conv2d
from attn_export.plugins.involution import involution2d
from attn_export.plugins.outlook import outlook_aggregate
from attn_export.plugins.registry import OPS

__all__ = [
    "TARGETS",
    "dynamic_conv2d",
    "involution2d",
    "onnx_translation_table",
    "outlook_aggregate",
    "reference_ops",
    "use_cuda_kernel",
]

#: Export targets: ``ort`` lowers every op into standard ONNX ops; ``trt`` into TensorRT plugin nodes.
TARGETS = ("ort", "trt")


def reference_ops() -> list:
    """``OpRun`` classes of the plugin nodes, for ``onnx.reference.ReferenceEvaluator(new_ops=...)``.

    Imports onnx (only) when called; see :mod:`attn_export.plugins.reference`.
    """
    from attn_export.plugins.reference import reference_ops as ops

    return ops()


def onnx_translation_table(target: str = "ort") -> dict:
    """``{op overload: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``.

    ``ort``: each op lowered into standard ONNX ops (``plugins/<op>/onnx_lowering.py``). ``trt``: each
    op call becomes one TensorRT plugin node (``plugins/<op>/plugin_node.py``; see
    :mod:`attn_export.plugins._trt_names`). The ops are those of :mod:`attn_export.plugins.registry`.
    Imports onnxscript (only) when called.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    import torch

    ops = torch.ops.attn_export
    if target == "trt":
        return {getattr(ops, s.op).default: importlib.import_module(s.plugin_node).plugin for s in OPS}
    return {getattr(ops, s.op).default: importlib.import_module(s.onnx_lowering).portable for s in OPS}
