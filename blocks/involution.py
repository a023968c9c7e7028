"""Involution (Li et al., "Involution: Inverting the Inherence of Convolution for Visual
Recognition", CVPR 2021; official code: github.com/d-li14/involution, ``cls/mmcls/models/utils/
involution_naive.py``).

A kernel is generated for every pixel from the (average-pooled when ``stride > 1``) input by
``1x1 conv -> BN -> ReLU -> 1x1 conv (with bias)`` to ``K*K*G`` channels, ``G = channels /
group_channels``; the output at each pixel is the ``K x K`` neighbourhood of the input weighted by
that pixel's kernel, shared by the ``group_channels`` channels of a group.

Differences from the official code:

- the aggregation is the :func:`attn_export.plugins.involution2d` op (shift-and-add, no ``K*K``-fold
  unfold buffer) instead of ``nn.Unfold`` + multiply + sum; the numbers are the same;
- ``reduction`` and ``group_channels`` are arguments (the official code hard-codes 4 and 16), and
  norm/activation layers are passed in;
- with ``stride > 1`` the pooling uses ``ceil_mode=True`` so that the kernel grid always matches the
  unfold grid ``ceil(H / stride)``; the official ``AvgPool2d(stride, stride)`` floors, which equals
  this for even sizes and makes the official code fail on odd ones;
- parameter names follow the official mmcv ``ConvModule`` layout (``conv1.conv``, ``conv1.bn``,
  ``conv2.conv``), so official checkpoints load directly.

The widely copied blog "InvolutionLayer" (a bmm attention over unfolded patches) is not involution
and is not followed here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from attn_export.blocks._checks import check_divisible, check_input, check_odd, check_positive
from attn_export.plugins import involution2d


class Involution2d(nn.Module):
    """Involution with a per-pixel, per-group ``kernel_size x kernel_size`` kernel.

    Input (B, channels, H, W); output (B, channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        reduction: int = 4,
        group_channels: int = 16,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive(name, channels=channels, stride=stride, reduction=reduction, group_channels=group_channels)
        check_odd(name, "kernel_size", kernel_size)
        check_divisible(name, "channels", channels, "group_channels", group_channels)
        check_divisible(name, "channels", channels, "reduction", reduction)
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.group_channels = group_channels
        self.groups = channels // group_channels
        mid = channels // reduction
        self.conv1 = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(channels, mid, 1, bias=False), bn=norm_layer(mid), activate=act_layer())
        )
        self.conv2 = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(mid, kernel_size * kernel_size * self.groups, 1, bias=True))
        )
        self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernels, (B, G, K*K, Ho, Wo)."""
        w = self.conv2(self.conv1(self.avgpool(x)))
        return w.unflatten(1, (self.groups, self.kernel_size * self.kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, "(B, C, H, W)", self.channels, 1)
        return involution2d(x, self.kernel(x), self.kernel_size, self.stride, (self.kernel_size - 1) // 2, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"
