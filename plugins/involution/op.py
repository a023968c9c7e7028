"""The ``attn_export::involution2d`` custom op: reference kernel, fake kernel, autograd, CUDA kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attn_export.plugins._taps import check_kernel_shape, tap_slice, window_grid


def check_args(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> tuple[int, int]:
    """Validate the arguments; return the output size ``(Ho, Wo)``."""
    if x.dim() != 4:
        raise ValueError(f"involution2d: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"involution2d: weight must be 5-D (B, G, k*k, Ho, Wo), got shape {tuple(weight.shape)}")
    if kernel_size < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"involution2d: need kernel_size, stride, dilation >= 1 and padding >= 0, got "
            f"kernel_size={kernel_size}, stride={stride}, padding={padding}, dilation={dilation}"
        )
    b, c, h, w = x.shape
    groups = weight.shape[1]
    if c % groups:
        raise ValueError(f"involution2d: channels ({c}) must be divisible by the groups in weight ({groups})")
    ho, wo = window_grid("involution2d", (h, w), kernel_size, stride, padding, dilation)
    args = f"kernel_size={kernel_size}, stride={stride}, padding={padding}, dilation={dilation}"
    expected = (b, groups, kernel_size * kernel_size, ho, wo)
    check_kernel_shape("involution2d", "weight", weight, f"x {tuple(x.shape)}", args, expected)
    return ho, wo


def reference(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Plain-torch shift-and-add: one fused multiply-add per tap, no unfold buffer."""
    ho, wo = check_args(x, weight, kernel_size, stride, padding, dilation)
    b, c, _, _ = x.shape
    g = weight.shape[1]
    xp = F.pad(x, (padding,) * 4).view(b, g, c // g, x.shape[2] + 2 * padding, x.shape[3] + 2 * padding)
    # fp16/bf16 accumulate in fp32, as the CUDA kernel and the TensorRT plugin do
    out = x.new_zeros((b, g, c // g, ho, wo), dtype=torch.promote_types(x.dtype, torch.float32))
    for t in range(kernel_size * kernel_size):
        a, bb = divmod(t, kernel_size)
        out.addcmul_(tap_slice(xp, a, bb, dilation, stride, ho, wo), weight[:, :, t : t + 1])
    return out.view(b, c, ho, wo).to(x.dtype)


@torch.library.custom_op("attn_export::involution2d", mutates_args=())
def involution2d(
    x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> torch.Tensor:
    """Involution aggregation. ``x``: (B, C, H, W); ``weight``: (B, G, k*k, Ho, Wo) -> (B, C, Ho, Wo)."""
    return reference(x, weight, kernel_size, stride, padding, dilation)


@involution2d.register_fake
def _(x, weight, kernel_size, stride=1, padding=0, dilation=1):
    ho, wo = check_args(x, weight, kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], x.shape[1], ho, wo))


@involution2d.register_kernel("cuda")
def _(x, weight, kernel_size, stride=1, padding=0, dilation=1):
    from attn_export.plugins._kernels import use_cuda_kernel

    if not use_cuda_kernel(x, weight):
        return reference(x, weight, kernel_size, stride, padding, dilation)
    from attn_export.plugins.involution.cuda_kernel import involution2d_cuda

    check_args(x, weight, kernel_size, stride, padding, dilation)
    return involution2d_cuda(x, weight, kernel_size, stride, padding, dilation)


def _setup_context(ctx, inputs, output):
    x, weight, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (kernel_size, stride, padding, dilation)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    k, s, p, d = ctx.geometry
    b, c, h, w = x.shape
    g = weight.shape[1]
    ho, wo = grad_out.shape[-2:]
    go = grad_out.reshape(b, g, c // g, ho, wo)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        gxp = x.new_zeros((b, g, c // g, h + 2 * p, w + 2 * p))
        for t in range(k * k):
            a, bb = divmod(t, k)
            tap_slice(gxp, a, bb, d, s, ho, wo).addcmul_(go, weight[:, :, t : t + 1])
        grad_x = gxp[..., p : p + h, p : p + w].reshape(b, c, h, w)
    if ctx.needs_input_grad[1]:
        xp = F.pad(x, (p,) * 4).view(b, g, c // g, h + 2 * p, w + 2 * p)
        grad_w = torch.stack([(go * tap_slice(xp, *divmod(t, k), d, s, ho, wo)).sum(2) for t in range(k * k)], dim=2)
    return grad_x, grad_w, None, None, None, None


involution2d.register_autograd(_backward, setup_context=_setup_context)
