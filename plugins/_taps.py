"""Tap geometry shared by the dynamic-kernel ops.

A *tap* is one position ``(a, b)`` of a ``k x k`` sliding window. Every op here is written as a sum
over taps of strided slices of a padded tensor ("shift and add"), which avoids materialising the
``k*k``-fold im2col buffer that ``F.unfold`` builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a sliding window along one axis (the convolution formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def window_grid(
    op: str, size: tuple[int, int], kernel: int, stride: int, padding: int, dilation: int | None = None
) -> tuple[int, int]:
    """The output grid of a ``kernel x kernel`` window over an ``H x W`` input; a ValueError naming ``op``
    when the window does not fit (``dilation`` None: the op has no dilation to mention)."""
    h, w = size
    ho = out_size(h, kernel, stride, padding, dilation or 1)
    wo = out_size(w, kernel, stride, padding, dilation or 1)
    if ho < 1 or wo < 1:
        dil = "" if dilation is None else f"(dilation {dilation}) "
        raise ValueError(
            f"{op}: input {h}x{w} is smaller than the {kernel}x{kernel} window {dil}after padding {padding}; "
            "pad more or use a smaller kernel"
        )
    return ho, wo


def check_kernel_shape(op: str, name: str, kernel: torch.Tensor, fits: str, args: str, expected: tuple) -> None:
    """A ValueError naming ``op`` when the dynamic kernel ``name`` is not of the ``expected`` shape."""
    if tuple(kernel.shape) != expected:
        shape = tuple(kernel.shape)
        raise ValueError(f"{op}: {name} shape {shape} does not fit {fits} with {args}: expected {expected}")


def tap_slice(xp: torch.Tensor, a: int, b: int, dilation: int, stride: int, ho: int, wo: int) -> torch.Tensor:
    """The strided view of padded ``xp`` that tap ``(a, b)`` reads for an ``ho x wo`` output."""
    r0, c0 = a * dilation, b * dilation
    return xp[..., r0 : r0 + stride * (ho - 1) + 1 : stride, c0 : c0 + stride * (wo - 1) + 1 : stride]


def unfold_taps(x: torch.Tensor, kernel: int, padding: int, stride: int, dilation: int = 1) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C, k*k, Ho, Wo)``: the same numbers as ``F.unfold``, laid out per tap."""
    ho = out_size(x.shape[-2], kernel, stride, padding, dilation)
    wo = out_size(x.shape[-1], kernel, stride, padding, dilation)
    xp = F.pad(x, (padding, padding, padding, padding))
    return torch.stack(
        [tap_slice(xp, a, b, dilation, stride, ho, wo) for a in range(kernel) for b in range(kernel)], dim=2
    )


def fold_taps(
    y: torch.Tensor, height: int, width: int, kernel: int, padding: int, stride: int, dilation: int = 1
) -> torch.Tensor:
    """``(B, C, k*k, Ho, Wo) -> (B, C, H, W)``: the adjoint of :func:`unfold_taps` (what ``F.fold`` does)."""
    ho, wo = y.shape[-2], y.shape[-1]
    hp, wp = height + 2 * padding, width + 2 * padding
    out = y.new_zeros((*y.shape[:-3], hp, wp))
    for t in range(kernel * kernel):
        a, b = divmod(t, kernel)
        tap_slice(out, a, b, dilation, stride, ho, wo).add_(y[..., t, :, :])
    return out[..., padding : padding + height, padding : padding + width]
