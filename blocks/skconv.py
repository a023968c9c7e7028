"""Selective Kernel convolution (Li et al., "Selective Kernel Networks", CVPR 2019; official code:
github.com/implus/SKNet (Caffe); PyTorch layouts: timm ``layers/selective_kernel.py``).

Split: branch ``i`` is a 3x3 grouped convolution with dilation ``1 + i`` (padding ``1 + i``), as the
paper recommends in place of larger kernels, then BN and ReLU. Fuse: the branches are summed, global
average pooled, and reduced by a 1x1 conv without bias to ``d = max(channels / reduction, min_dim)``,
BN, ReLU. Select: a 1x1 conv to ``branches * channels``, a softmax across branches per channel, and the
branches are summed with those weights.

Differences from common PyTorch ports:

- the select step is one 1x1 conv producing all branches' logits (``fcs`` as one layer, as timm's
  ``SelectiveKernelAttn``), rather than a ``ModuleList`` of per-branch ``Linear`` layers; the two are
  the same function (a checkpoint of the list form maps onto it by concatenation);
- ``stride`` applies to every branch convolution, as in the paper's SK unit.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from attn_export.blocks._checks import check_divisible, check_input, check_positive


class SKConv(nn.Module):
    """SK convolution: (B, channels, H, W) -> (B, channels, ceil(H / stride), ceil(W / stride))."""

    def __init__(
        self,
        channels: int,
        branches: int = 2,
        groups: int = 32,
        reduction: int = 16,
        min_dim: int = 32,
        stride: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive(
            name,
            channels=channels,
            branches=branches,
            groups=groups,
            reduction=reduction,
            min_dim=min_dim,
            stride=stride,
        )
        check_divisible(name, "channels", channels, "groups", groups)
        self.channels = channels
        self.branches = branches
        d = max(channels // reduction, min_dim)
        self.convs = nn.ModuleList(
            nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(
                        channels, channels, 3, stride, padding=1 + i, dilation=1 + i, groups=groups, bias=False
                    ),
                    bn=norm_layer(channels),
                    act=act_layer(),
                )
            )
            for i in range(branches)
        )
        self.fc = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(channels, d, 1, bias=False), bn=norm_layer(d), act=act_layer())
        )
        self.fcs = nn.Conv2d(d, branches * channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, "(B, C, H, W)", self.channels, 1)
        feats = torch.stack([conv(x) for conv in self.convs], dim=1)  # B, M, C, H, W
        z = self.fc(feats.sum(1).mean((2, 3), keepdim=True))
        weights = self.fcs(z).unflatten(1, (self.branches, self.channels)).softmax(dim=1)  # B, M, C, 1, 1
        return (feats * weights).sum(1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, branches={self.branches}"
