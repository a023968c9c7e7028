"""Omni-dimensional dynamic convolution (Li, Zhou and Yao, "Omni-Dimensional Dynamic Convolution",
ICLR 2022; official code: github.com/OSVAI/ODConv, ``modules/odconv.py``).

An attention branch (global average pool -> 1x1 conv without bias -> BN -> ReLU) feeds four heads,
each divided by a temperature (1.0 at inference, see :meth:`ODConv2d.update_temperature`):

- channel: sigmoid, one weight per input channel, multiplies the input;
- filter: sigmoid, one weight per output channel, multiplies the output (skipped for depthwise);
- spatial: sigmoid over the ``k x k`` positions (skipped for ``k = 1``);
- kernel: softmax over the ``kernel_num`` candidate kernels (skipped for ``kernel_num = 1``).

The per-sample kernel is ``sum_n kernel_att[n] * spatial_att * W[n]`` and
``out = filter_att * conv(x * channel_att, per-sample kernel)``.

Differences from the official code:

- the per-sample convolution is the :func:`attn_export.plugins.dynamic_conv2d` op instead of a
  convolution with the batch folded into the groups (``groups = groups * B``), which freezes the
  batch size into an exported graph and breaks dynamic-batch export; the numbers are the same;
- the kernel attention combines the candidate kernels with one matrix product, and the channel and
  filter attentions multiply the per-sample kernel instead of the input and the output where the
  kernel is the smaller tensor (the convolution is linear in both; equal up to rounding);
- ``min_channel`` is an argument (the official ``ODConv2d`` does not pass it to its attention);
- norm/activation layers are passed in; the temperature is a buffer-free float, as upstream;
- parameter names follow the official layout (``attention.fc``, ``attention.bn``,
  ``attention.channel_fc``/``filter_fc``/``spatial_fc``/``kernel_fc``, 5-D ``weight``), so official
  checkpoints load directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attn_export.blocks._checks import check_divisible, check_input, check_positive
from attn_export.plugins import dynamic_conv2d


class ODConvAttention(nn.Module):
    """The four attention heads of ODConv (official name: ``Attention``)."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        min_channel: int = 16,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        attention_channel = max(int(in_planes * reduction), min_channel)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0
        self.fc = nn.Conv2d(in_planes, attention_channel, 1, bias=False)
        self.bn = norm_layer(attention_channel)
        self.act = act_layer()
        self.channel_fc = nn.Conv2d(attention_channel, in_planes, 1, bias=True)
        self.depthwise = in_planes == groups and in_planes == out_planes
        self.filter_fc = None if self.depthwise else nn.Conv2d(attention_channel, out_planes, 1, bias=True)
        self.spatial_fc = (
            None if kernel_size == 1 else nn.Conv2d(attention_channel, kernel_size * kernel_size, 1, bias=True)
        )
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(attention_channel, kernel_num, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return (channel (B,Cin,1,1), filter (B,Cout,1,1) or None, spatial (B,1,1,k,k) or None,
        kernel (B,n,1,1,1,1) or None)."""
        b = x.shape[0]
        z = self.act(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(z) / t)
        filt = None if self.filter_fc is None else torch.sigmoid(self.filter_fc(z) / t)
        spatial = None
        if self.spatial_fc is not None:
            spatial = torch.sigmoid(self.spatial_fc(z).reshape(b, 1, 1, self.kernel_size, self.kernel_size) / t)
        kernel = None
        if self.kernel_fc is not None:
            kernel = F.softmax(self.kernel_fc(z).reshape(b, self.kernel_num, 1, 1, 1, 1) / t, dim=1)
        return channel, filt, spatial, kernel


class ODConv2d(nn.Module):
    """ODConv: input (B, in_planes, H, W), output (B, out_planes, Ho, Wo) as ``nn.Conv2d``."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        min_channel: int = 16,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive(
            name,
            in_planes=in_planes,
            out_planes=out_planes,
            kernel_size=kernel_size,
            stride=stride,
            dilation=dilation,
            groups=groups,
            reduction=reduction,
            kernel_num=kernel_num,
            min_channel=min_channel,
        )
        if padding < 0:
            raise ValueError(f"{name}: padding must be >= 0, got {padding}")
        check_divisible(name, "in_planes", in_planes, "groups", groups)
        check_divisible(name, "out_planes", out_planes, "groups", groups)
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.kernel_num = kernel_num
        self.attention = ODConvAttention(
            in_planes, out_planes, kernel_size, groups, reduction, kernel_num, min_channel, norm_layer, act_layer
        )
        self.weight = nn.Parameter(torch.empty(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i in range(self.kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def update_temperature(self, temperature: float) -> None:
        """Set the attention temperature (the paper anneals it during early training; 1.0 at inference)."""
        self.attention.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, "(B, C, H, W)", self.in_planes, 1)
        channel, filt, spatial, kernel = self.attention(x)
        conv = dict(stride=[self.stride] * 2, padding=[self.padding] * 2, dilation=[self.dilation] * 2)
        if self.kernel_size == 1 and self.kernel_num == 1:
            # The same kernel for every sample: a plain convolution.
            out = F.conv2d(x * channel, self.weight[0], None, groups=self.groups, **conv)
            return out if filt is None else out * filt
        b, g, k = x.shape[0], self.groups, self.kernel_size
        n, cout, cin_g = self.kernel_num, self.out_planes, self.in_planes // g
        # The kernel attention: one matrix product over the candidate kernels.
        flat = self.weight.reshape(n, -1)
        w = flat.expand(b, -1) if kernel is None else kernel.reshape(b, n) @ flat  # B, Cout*Cin/g*k*k
        # The spatial, channel and filter attentions scale the per-sample kernel: the convolution is
        # linear in its input channels and its output channels, so x * channel and out * filter fold
        # into one product with the kernel, wherever the kernel is the smaller tensor (it is per sample
        # Cout*Cin/g*k*k values against Cin*H*W for the input and Cout*Ho*Wo for the output).
        ho = (x.shape[2] + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
        wo = (x.shape[3] + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
        size = cout * cin_g * k * k
        fold_in, fold_out = size < self.in_planes * x.shape[2] * x.shape[3], size < cout * ho * wo
        scale = None if spatial is None else spatial.reshape(b, 1, 1, 1, k * k)
        if fold_in:
            c = channel.reshape(b, g, 1, cin_g, 1)
            scale = c if scale is None else scale * c
        else:
            x = x * channel
        if fold_out and filt is not None:
            f = filt.reshape(b, g, cout // g, 1, 1)
            scale = f if scale is None else scale * f
        w = w.reshape(b, g, cout // g, cin_g, k * k)
        if scale is not None:
            w = w * scale
        out = dynamic_conv2d(x, w.reshape(b, cout, cin_g, k, k), groups=g, **conv)
        return out if filt is None or fold_out else out * filt

    def extra_repr(self) -> str:
        return (
            f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"kernel_num={self.kernel_num}"
        )
