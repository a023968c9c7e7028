"""The ``attn_export::outlook_aggregate`` custom op: reference, fake kernel, autograd, CUDA kernel."""

from __future__ import annotations

import torch

from attn_export.plugins._taps import check_kernel_shape, fold_taps, unfold_taps, window_grid


def check_args(v: torch.Tensor, attn: torch.Tensor, kernel_size: int, padding: int, stride: int) -> tuple[int, int]:
    """Validate the arguments; return the window grid ``(h, w)``."""
    if v.dim() != 4:
        raise ValueError(f"outlook_aggregate: v must be 4-D (B, C, H, W), got shape {tuple(v.shape)}")
    if attn.dim() != 5:
        raise ValueError(
            f"outlook_aggregate: attn must be 5-D (B, heads, h*w, k*k, k*k), got shape {tuple(attn.shape)}"
        )
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise ValueError(
            f"outlook_aggregate: need kernel_size, stride >= 1 and padding >= 0, got "
            f"kernel_size={kernel_size}, padding={padding}, stride={stride}"
        )
    b, c, hh, ww = v.shape
    heads = attn.shape[1]
    if heads < 1 or c % heads:
        raise ValueError(f"outlook_aggregate: channels ({c}) must be divisible by the heads in attn ({heads})")
    h, w = window_grid("outlook_aggregate", (hh, ww), kernel_size, stride, padding)
    args = f"kernel_size={kernel_size}, padding={padding}, stride={stride}"
    kk = kernel_size * kernel_size
    check_kernel_shape("outlook_aggregate", "attn", attn, f"v {tuple(v.shape)}", args, (b, heads, h * w, kk, kk))
    return h, w


def _windows(v: torch.Tensor, heads: int, kernel_size: int, padding: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, h*w, k*k, C/heads): the unfolded windows in the attention's layout."""
    b, c = v.shape[:2]
    taps = unfold_taps(v, kernel_size, padding, stride)  # B, C, kk, h, w
    return taps.reshape(b, heads, c // heads, kernel_size * kernel_size, -1).permute(0, 1, 4, 3, 2)


def _fold(
    y: torch.Tensor, shape: torch.Size, h: int, w: int, kernel_size: int, padding: int, stride: int
) -> torch.Tensor:
    """(B, heads, h*w, k*k, C/heads) -> (B, C, H, W): sum the windows back into place."""
    b, c, hh, ww = shape
    taps = y.permute(0, 1, 4, 3, 2).reshape(b, c, kernel_size * kernel_size, h, w)
    return fold_taps(taps, hh, ww, kernel_size, padding, stride).contiguous()


def reference(v: torch.Tensor, attn: torch.Tensor, kernel_size: int, padding: int, stride: int) -> torch.Tensor:
    """Plain torch: tap-wise unfold, one batched matmul, tap-wise fold."""
    h, w = check_args(v, attn, kernel_size, padding, stride)
    acc = torch.promote_types(v.dtype, torch.float32)  # fp16/bf16 accumulate in fp32, as the CUDA kernel does
    windows = _windows(v.to(acc), attn.shape[1], kernel_size, padding, stride)
    return _fold(attn.to(acc) @ windows, v.shape, h, w, kernel_size, padding, stride).to(v.dtype)


@torch.library.custom_op("attn_export::outlook_aggregate", mutates_args=())
def outlook_aggregate(
    v: torch.Tensor, attn: torch.Tensor, kernel_size: int = 3, padding: int = 1, stride: int = 1
) -> torch.Tensor:
    """Outlook aggregation. ``v``: (B, C, H, W); ``attn``: (B, heads, h*w, k*k, k*k) -> (B, C, H, W)."""
    return reference(v, attn, kernel_size, padding, stride)


@outlook_aggregate.register_fake
def _(v, attn, kernel_size=3, padding=1, stride=1):
    check_args(v, attn, kernel_size, padding, stride)
    return v.new_empty(v.shape)


@outlook_aggregate.register_kernel("cuda")
def _(v, attn, kernel_size=3, padding=1, stride=1):
    from attn_export.plugins._kernels import use_cuda_kernel

    if not use_cuda_kernel(v, attn):
        return reference(v, attn, kernel_size, padding, stride)
    from attn_export.plugins.outlook.cuda_kernel import outlook_aggregate_cuda

    check_args(v, attn, kernel_size, padding, stride)
    return outlook_aggregate_cuda(v, attn, kernel_size, padding, stride)


def _setup_context(ctx, inputs, output):
    v, attn, kernel_size, padding, stride = inputs
    ctx.save_for_backward(v, attn)
    ctx.geometry = (kernel_size, padding, stride)


def _backward(ctx, grad_out):
    v, attn = ctx.saved_tensors
    k, p, s = ctx.geometry
    heads = attn.shape[1]
    h, w = check_args(v, attn, k, p, s)
    grad_y = _windows(grad_out, heads, k, p, s)  # the adjoint of the fold is the unfold
    grad_v = grad_attn = None
    if ctx.needs_input_grad[0]:
        grad_v = _fold(attn.transpose(-1, -2) @ grad_y, v.shape, h, w, k, p, s)
    if ctx.needs_input_grad[1]:
        grad_attn = grad_y @ _windows(v, heads, k, p, s).transpose(-1, -2)
    return grad_v, grad_attn, None, None, None


outlook_aggregate.register_autograd(_backward, setup_context=_setup_context)
