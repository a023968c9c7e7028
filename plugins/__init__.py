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

__all__ = ["TARGETS", "dynamic_conv2d", "involution2d", "onnx_translation_table", "outlook_aggregate"]

#: Export targets: ``ort`` lowers every op into standard ONNX ops; ``trt`` into TensorRT plugin nodes.
TARGETS = ("ort", "trt")


@functools.cache
def _triton_available() -> bool:
    """Whether Triton can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors) -> bool:
    """Whether the CUDA kernels should take the Triton path for these inputs.

    Triton kernels cover fp32/fp16/bf16 with every input on one device; anything else (float64, for
    gradcheck) takes the plain-torch reference. Mixed devices are an error.
    """
    import torch

    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in tensors}
    return _triton_available() and len(dtypes) == 1 and dtypes <= {torch.float32, torch.float16, torch.bfloat16}


def onnx_translation_table(target: str = "ort") -> dict:
    """``{op overload: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``.

    Imports onnxscript (only) when called.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "trt":
        raise NotImplementedError("target 'trt' (TensorRT plugin nodes) is not implemented yet; use --target ort")
    import torch

    from attn_export.plugins.dynamic_conv import onnx_lowering as dyn
    from attn_export.plugins.involution import onnx_lowering as inv
    from attn_export.plugins.outlook import onnx_lowering as outl

    ops = torch.ops.attn_export
    return {
        ops.involution2d.default: inv.portable,
        ops.dynamic_conv2d.default: dyn.portable,
        ops.outlook_aggregate.default: outl.portable,
    }
