"""The ``attn_export::dynamic_conv2d`` custom op: reference kernel, fake kernel, autograd, CUDA kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attn_export.plugins._taps import out_size

#: The int pairs (rows, columns) of ``stride``, ``padding`` and ``dilation``.
Ints = Sequence[int]


def check_args(x: Tensor, weight: Tensor, stride: Ints, padding: Ints, dilation: Ints, groups: int) -> tuple[int, int]:
    """Validate the arguments; return the output size ``(Ho, Wo)``."""
    if x.dim() != 4:
        raise ValueError(f"dynamic_conv2d: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(
            "dynamic_conv2d: weight must be 5-D (B, C_out, C_in/groups, kH, kW), one kernel per sample; "
            f"got shape {tuple(weight.shape)}"
        )
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or min(v) < low:
            raise ValueError(f"dynamic_conv2d: {name} must be two ints >= {low}, got {list(v)}")
    b, cin, h, w = x.shape
    if groups < 1 or cin % groups or weight.shape[1] % groups:
        raise ValueError(
            f"dynamic_conv2d: groups={groups} must divide in channels ({cin}) and out channels ({weight.shape[1]})"
        )
    if weight.shape[0] != b or weight.shape[2] != cin // groups:
        raise ValueError(
            f"dynamic_conv2d: weight shape {tuple(weight.shape)} does not fit x {tuple(x.shape)} with "
            f"groups={groups}: expected ({b}, C_out, {cin // groups}, kH, kW)"
        )
    kh, kw = weight.shape[-2:]
    ho = out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = out_size(w, kw, stride[1], padding[1], dilation[1])
    if ho < 1 or wo < 1:
        raise ValueError(f"dynamic_conv2d: input {h}x{w} is smaller than the kernel {kh}x{kw} after padding")
    return ho, wo


def _folded(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    b, cin, h, w = x.shape
    return x.reshape(1, b * cin, h, w), weight.reshape(b * weight.shape[1], *weight.shape[2:])


def reference(x: Tensor, weight: Tensor, stride: Ints, padding: Ints, dilation: Ints, groups: int) -> Tensor:
    """Plain torch: one grouped convolution with the batch folded into the groups (eager only)."""
    ho, wo = check_args(x, weight, stride, padding, dilation, groups)
    xf, wf = _folded(x, weight)
    out = F.conv2d(xf, wf, None, list(stride), list(padding), list(dilation), groups * x.shape[0])
    return out.view(x.shape[0], weight.shape[1], ho, wo)


@torch.library.custom_op("attn_export::dynamic_conv2d", mutates_args=())
def dynamic_conv2d(x: Tensor, weight: Tensor, stride: Ints, padding: Ints, dilation: Ints, groups: int) -> Tensor:
    """Per-sample convolution. ``x``: (B, Cin, H, W); ``weight``: (B, Cout, Cin/groups, kH, kW)."""
    return reference(x, weight, stride, padding, dilation, groups)


@dynamic_conv2d.register_fake
def _(x, weight, stride, padding, dilation, groups):
    ho, wo = check_args(x, weight, stride, padding, dilation, groups)
    return x.new_empty((x.shape[0], weight.shape[1], ho, wo))


@dynamic_conv2d.register_kernel("cuda")
def _(x, weight, stride, padding, dilation, groups):
    # The batch-folded grouped convolution (cuDNN) is the fastest correct path on CUDA: 0.27 ms at
    # B32 C256 28x28 k3 on an H200 against 4.2 ms for a Triton kernel. The Triton kernels
    # (``cuda_kernel.py``) serve the TensorRT plugin, where there is no cuDNN call.
    # fp32 precision is torch's choice, as for F.conv2d: with ``torch.backends.cudnn.allow_tf32`` (torch's
    # default True) cuDNN may use TF32 products (about 1e-3 relative error); set it False for IEEE fp32.
    if len({x.device, weight.device}) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(x.device), str(weight.device)})}")
    return reference(x, weight, stride, padding, dilation, groups)


def _setup_context(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    b = x.shape[0]
    xf, wf = _folded(x, weight)
    gof = grad_out.reshape(1, b * weight.shape[1], *grad_out.shape[-2:])
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gof,
        xf,
        wf,
        None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups * b,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
    )
    grad_x = gx.view_as(x) if gx is not None else None
    grad_w = gw.view_as(weight) if gw is not None else None
    return grad_x, grad_w, None, None, None, None


dynamic_conv2d.register_autograd(_backward, setup_context=_setup_context)
