"""GSoP channel attention (Gao et al., "Global Second-order Pooling Convolutional Networks",
CVPR 2019; official code: github.com/ZilinGao/Global-Second-order-Pooling-Convnet, the
``chan_att`` branch of its ResNet ``Bottleneck`` with ``attention='1'``).

``1x1 conv -> BN -> ReLU`` reduces the input to ``mid_channels``; the covariance of those features
over the ``H*W`` positions (biased, divided by ``H*W``, as ``MPNCOV.CovpoolLayer``) is a
``mid x mid`` matrix per sample; after a BatchNorm over its rows, a row-wise convolution (kernel
``(mid, 1)``, ``groups=mid``) maps it to ``4*mid`` values, a ``1x1`` conv maps those to
``in_channels`` weights, sigmoid, and the output is ``input * weights``. As in the official
``chan_att`` there is no activation between the row-wise conv and the ``1x1`` conv (the official
position attention ``pos_att`` has one there; its channel attention does not).

Differences from the official code:

- ``mid_channels`` is an argument (official: ``att_dim=128``);
- ``dr_stride`` is the stride of the reduction conv: 1 by default; the official ResNet ``Bottleneck``
  uses 2 where ``planes <= 64`` (a speed trick of that network: the covariance is taken over every
  other row and column), which the adapter of :mod:`attn_export.export.adapt` carries over;
- ``row_relu=True`` adds a ReLU after the row-wise conv. The official channel attention has none;
  the option exists for models trained with one (the shipped shapes detector was, and is built so);
- the official branch starts with a ReLU of its input (``relu_normal``); it is kept, as
  ``pre_act=True`` (the default), so official weights give the official outputs;
- the covariance is computed with two batched matmuls (no ``H*W x H*W`` centring matrix as
  ``CovpoolLayer`` builds);
- parameter names are the official ones (``conv_for_DR``, ``bn_for_DR``, ``row_bn``,
  ``row_conv_group``, ``fc_adapt_channels``).

The widely copied blog code applies ``BatchNorm2d(mid_channels)`` to the ``in_channels`` input and
multiplies the reduced tensor by the weights; both are wrong and not followed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attn_export.blocks._checks import check_input, check_positive


def covariance(z: torch.Tensor) -> torch.Tensor:
    """Biased covariance over positions: (B, d, H, W) -> (B, d, d), divided by H*W."""
    f = z.flatten(2)
    f = f - f.mean(dim=2, keepdim=True)
    return f @ f.transpose(1, 2) / f.shape[2]


class GSoPBlock(nn.Module):
    """GSoP channel attention: input (B, in_channels, H, W) -> same shape."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int = 128,
        pre_act: bool = True,
        dr_stride: int = 1,
        row_relu: bool = False,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        check_positive(type(self).__name__, in_channels=in_channels, mid_channels=mid_channels, dr_stride=dr_stride)
        self.in_channels = in_channels
        self.mid_channels = mid_channels
        self.dr_stride = dr_stride
        self.row_relu = row_relu
        self.pre_act = act_layer() if pre_act else nn.Identity()
        self.conv_for_DR = nn.Conv2d(in_channels, mid_channels, 1, stride=dr_stride, bias=True)
        self.bn_for_DR = norm_layer(mid_channels)
        self.act = act_layer()
        self.row_bn = norm_layer(mid_channels)
        self.row_conv_group = nn.Conv2d(
            mid_channels, 4 * mid_channels, (mid_channels, 1), groups=mid_channels, bias=True
        )
        self.row_act = act_layer() if row_relu else nn.Identity()
        self.fc_adapt_channels = nn.Conv2d(4 * mid_channels, in_channels, 1, bias=True)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights, (B, in_channels, 1, 1)."""
        z = self.act(self.bn_for_DR(self.conv_for_DR(self.pre_act(x))))
        # The covariance sums H*W products (in fp16 it overflows once features reach about 20 on a
        # 20x20 map) and row_bn normalises it: both run in fp32 or wider (no-ops in fp32 and fp64).
        cov = covariance(z.to(torch.promote_types(z.dtype, torch.float32))).unsqueeze(-1)  # B, d, d, 1
        bn = self.row_bn
        if isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_var is not None:
            f32 = [
                None if t is None else t.to(cov.dtype) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)
            ]
            cov = F.batch_norm(cov, *f32, False, 0.0, bn.eps)
        else:
            cov = bn(cov.to(bn.weight.dtype if getattr(bn, "weight", None) is not None else z.dtype))
        y = self.row_act(self.row_conv_group(cov.to(z.dtype)))  # B, 4d, 1, 1
        return torch.sigmoid(self.fc_adapt_channels(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, "(B, C, H, W)", self.in_channels, 1)
        return x * self.attention(x)

    def extra_repr(self) -> str:
        extra = f", dr_stride={self.dr_stride}" if self.dr_stride != 1 else ""
        extra += ", row_relu=True" if self.row_relu else ""
        return f"in_channels={self.in_channels}, mid_channels={self.mid_channels}{extra}"


class GSoPAttention(GSoPBlock):
    """The channel weights alone: input (B, in_channels, H, W) -> (B, in_channels, 1, 1).

    What the official ``Bottleneck.chan_att`` method returns; the adapter puts one in a Bottleneck
    and routes ``chan_att`` through it, so the block is exported (and verified) as a module of its own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, "(B, C, H, W)", self.in_channels, 1)
        return self.attention(x)
