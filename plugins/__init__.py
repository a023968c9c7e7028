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

import functools
import importlib.util

from attn_export.plugins.dynamic_conv import dynamic_conv2d
from attn_export.plugins.involution import involution2d
from attn_export.plugins.outlook import outlook_aggregate

__all__ = [
    "TARGETS",
    "dynamic_conv2d",
    "involution2d",
    "onnx_translation_table",
    "outlook_aggregate",
    "reference_ops",
]

#: Export targets: ``ort`` lowers every op into standard ONNX ops; ``trt`` into TensorRT plugin nodes.
TARGETS = ("ort", "trt")


@functools.cache
def _kernels_available() -> bool:
    """Whether Triton can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_cuda_kernel(*tensors) -> bool:
    """Whether the CUDA kernels should take the Triton path for these inputs.

    Triton kernels cover fp32/fp16/bf16 with every input on one device; anything else (float64, for
    gradcheck) takes the plain-torch reference. Mixed devices are an error.
    """
    import torch

    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in tensors}
    return (
        _kernels_available() and len(dtypes) == 1 and dtypes <= {torch.float32, torch.float16, torch.bfloat16}
    )


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
    :mod:`attn_export.plugins._trt_names`). Imports onnxscript (only) when called.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    import torch

    ops = torch.ops.attn_export
    if target == "trt":
        from attn_export.plugins.dynamic_conv import plugin_node as dyn_node
        from attn_export.plugins.involution import plugin_node as inv_node
        from attn_export.plugins.outlook import plugin_node as outl_node

        return {
            ops.involution2d.default: inv_node.plugin,
            ops.dynamic_conv2d.default: dyn_node.plugin,
            ops.outlook_aggregate.default: outl_node.plugin,
        }
    from attn_export.plugins.dynamic_conv import onnx_lowering as dyn
    from attn_export.plugins.involution import onnx_lowering as inv
    from attn_export.plugins.outlook import onnx_lowering as outl

    return {
        ops.involution2d.default: inv.portable,
        ops.dynamic_conv2d.default: dyn.portable,
        ops.outlook_aggregate.default: outl.portable,
    }
