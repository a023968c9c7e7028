"""Re-implementations of the OFFICIAL code of each block, for tests and benchmarks only.

These classes follow the public layouts of the official repositories (class names, attribute
names, parameter names and forward semantics), written afresh, not copied:

- ``involution``: d-li14/involution, ``involution_naive.py`` (``nn.Unfold``, multiply, sum; the
  mmcv ``ConvModule`` children ``conv``/``bn``/``activate``);
- ``ODConv2d`` / ``Attention``: OSVAI/ODConv, ``modules/odconv.py`` (the batch folded into the
  convolution groups, ``groups * batch_size``);
- ``OutlookAttention``: sail-sg/volo, ``models/volo.py`` (``nn.Unfold`` and ``F.fold``);
- ``GSoP``: the ``chan_att`` branch of ZilinGao/Global-Second-order-Pooling-Convnet as a standalone
  module, with the ``MPNCOV.CovpoolLayer`` centring-matrix covariance; ``Bottleneck``: that
  repository's GSoP ResNet bottleneck (``torchvision/models/resnet.py``), where the attention is the
  ``chan_att`` METHOD beside ``conv1``..``conv3``, with a stride-2 ``conv_for_DR`` when ``planes <= 64``;
- ``SKConv``: the widely used SKNet PyTorch port (growing kernels, ``Linear`` ``fc`` and ``fcs``).

A few keyword options that the official code does not have let the tests of :mod:`attn_export.blocks`
compare every configuration of our blocks with these modules; their defaults are the official
behaviour: ``involution(reduction_ratio=, group_channels=, ceil_mode=)`` (``ceil_mode`` pooling, so odd
sizes work with ``stride > 1``), ``ODConv2d(min_channel=)`` (passed to ``Attention``),
``GSoP(pre_act=, dr_stride=, row_relu=)`` (``row_relu``: a ReLU after the row convolution).

They serve two purposes: (1) they are the foreign modules that the adapters of
:mod:`attn_export.export.adapt` must recognise and swap for attn-export's blocks, and (2) they are
the eager baseline of the benchmark. They are NOT for use in models: use :mod:`attn_export.blocks`.
(The official ODConv freezes the batch size into an exported graph and the official VOLO code
exports a ``Col2Im``; those are the problems the package's blocks solve.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Bottleneck", "GSoP", "ODConv2d", "OutlookAttention", "SKConv", "involution"]


# --- d-li14/involution ---------------------------------------------------------------------------------
class _ConvModule(nn.Module):
    """The part of mmcv's ``ConvModule`` the official involution uses: conv -> [bn] -> [activate].

    As mmcv with ``bias='auto'``: the convolution has a bias only when there is no norm layer.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(out_channels)
        if act:
            self.activate = nn.ReLU(inplace=True)
        self.with_norm = norm
        self.with_activation = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        if self.with_activation:
            x = self.activate(x)
        return x


class involution(nn.Module):  # the official class name
    """Official naive involution: per-pixel kernels applied to ``nn.Unfold`` patches."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        stride: int,
        *,
        reduction_ratio: int = 4,
        group_channels: int = 16,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.channels = channels
        self.group_channels = group_channels
        self.groups = self.channels // self.group_channels
        self.conv1 = _ConvModule(channels, channels // reduction_ratio, norm=True, act=True)
        self.conv2 = _ConvModule(channels // reduction_ratio, kernel_size**2 * self.groups, norm=False, act=False)
        if stride > 1:
            self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=ceil_mode)
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv2(self.conv1(x if self.stride == 1 else self.avgpool(x)))
        b, _, h, w = weight.shape
        kk = self.kernel_size**2
        weight = weight.view(b, self.groups, kk, h, w).unsqueeze(2)
        out = self.unfold(x).view(b, self.groups, self.group_channels, kk, h, w)
        return (weight * out).sum(dim=3).view(b, self.channels, h, w)


# --- OSVAI/ODConv ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Official ODConv attention: channel, filter, spatial and kernel attentions from one pooled vector."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: int = 4,
        min_channel: int = 16,
    ) -> None:
        super().__init__()
        attention_channel = max(int(in_planes * reduction), min_channel)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(in_planes, attention_channel, 1, bias=False)
        self.bn = nn.BatchNorm2d(attention_channel)
        self.relu = nn.ReLU(inplace=True)

        self.channel_fc = nn.Conv2d(attention_channel, in_planes, 1, bias=True)
        self.func_channel = self.get_channel_attention

        if in_planes == groups and in_planes == out_planes:  # depthwise: no filter attention
            self.func_filter = self.skip
        else:
            self.filter_fc = nn.Conv2d(attention_channel, out_planes, 1, bias=True)
            self.func_filter = self.get_filter_attention

        if kernel_size == 1:  # pointwise: no spatial attention
            self.func_spatial = self.skip
        else:
            self.spatial_fc = nn.Conv2d(attention_channel, kernel_size * kernel_size, 1, bias=True)
            self.func_spatial = self.get_spatial_attention

        if kernel_num == 1:
            self.func_kernel = self.skip
        else:
            self.kernel_fc = nn.Conv2d(attention_channel, kernel_num, 1, bias=True)
            self.func_kernel = self.get_kernel_attention

        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def update_temperature(self, temperature: float) -> None:
        self.temperature = temperature

    @staticmethod
    def skip(_: torch.Tensor) -> float:
        return 1.0

    def get_channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.channel_fc(x).view(x.size(0), -1, 1, 1) / self.temperature)

    def get_filter_attention(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.filter_fc(x).view(x.size(0), -1, 1, 1) / self.temperature)

    def get_spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        att = self.spatial_fc(x).view(x.size(0), 1, 1, 1, self.kernel_size, self.kernel_size)
        return torch.sigmoid(att / self.temperature)

    def get_kernel_attention(self, x: torch.Tensor) -> torch.Tensor:
        att = self.kernel_fc(x).view(x.size(0), -1, 1, 1, 1, 1)
        return F.softmax(att / self.temperature, dim=1)

    def forward(self, x: torch.Tensor):
        x = self.relu(self.bn(self.fc(self.avgpool(x))))
        return self.func_channel(x), self.func_filter(x), self.func_spatial(x), self.func_kernel(x)


class ODConv2d(nn.Module):
    """Official ODConv: per-sample kernels applied by one convolution with ``groups * batch_size`` groups."""

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
        *,
        min_channel: int = 16,
    ) -> None:
        super().__init__()
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.kernel_num = kernel_num
        self.attention = Attention(
            in_planes,
            out_planes,
            kernel_size,
            groups=groups,
            reduction=reduction,
            kernel_num=kernel_num,
            min_channel=min_channel,
        )
        self.weight = nn.Parameter(
            torch.randn(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size), requires_grad=True
        )
        self._initialize_weights()

        if self.kernel_size == 1 and self.kernel_num == 1:
            self._forward_impl = self._forward_impl_pw1x
        else:
            self._forward_impl = self._forward_impl_common

    def _initialize_weights(self) -> None:
        for i in range(self.kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def update_temperature(self, temperature: float) -> None:
        self.attention.update_temperature(temperature)

    def _forward_impl_common(self, x: torch.Tensor) -> torch.Tensor:
        channel_att, filter_att, spatial_att, kernel_att = self.attention(x)
        batch_size, _, height, width = x.size()
        x = x * channel_att
        x = x.reshape(1, -1, height, width)
        aggregate_weight = spatial_att * kernel_att * self.weight.unsqueeze(dim=0)
        aggregate_weight = torch.sum(aggregate_weight, dim=1).view(
            [-1, self.in_planes // self.groups, self.kernel_size, self.kernel_size]
        )
        output = F.conv2d(
            x,
            weight=aggregate_weight,
            bias=None,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups * batch_size,
        )
        output = output.view(batch_size, self.out_planes, output.size(-2), output.size(-1))
        return output * filter_att

    def _forward_impl_pw1x(self, x: torch.Tensor) -> torch.Tensor:
        channel_att, filter_att, _, _ = self.attention(x)
        x = x * channel_att
        output = F.conv2d(
            x,
            weight=self.weight.squeeze(dim=0),
            bias=None,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        return output * filter_att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


# --- sail-sg/volo ------------------------------------------------------------------------------------------
class OutlookAttention(nn.Module):
    """Official VOLO outlook attention on channels-last input (B, H, W, C), with ``nn.Unfold`` and ``F.fold``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = qk_scale or head_dim**-0.5

        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size**4 * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        self.unfold = nn.Unfold(kernel_size=kernel_size, padding=padding, stride=stride)
        self.pool = nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape  # the official names
        kk = self.kernel_size * self.kernel_size
        heads = self.num_heads

        v = self.v(x).permute(0, 3, 1, 2)  # B, C, H, W
        h, w = -(-H // self.stride), -(-W // self.stride)  # ceil
        v = self.unfold(v).reshape(B, heads, C // heads, kk, h * w).permute(0, 1, 4, 3, 2)  # B, heads, N, kk, C/heads

        attn = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        attn = self.attn(attn).reshape(B, h * w, heads, kk, kk).permute(0, 2, 1, 3, 4)  # B, heads, N, kk, kk
        attn = attn * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)

        x = (attn @ v).permute(0, 1, 4, 3, 2).reshape(B, C * kk, h * w)
        x = F.fold(x, output_size=(H, W), kernel_size=self.kernel_size, padding=self.padding, stride=self.stride)

        x = self.proj(x.permute(0, 2, 3, 1))
        return self.proj_drop(x)


# --- ZilinGao/Global-Second-order-Pooling-Convnet ---------------------------------------------------------
def CovpoolLayer(x: torch.Tensor) -> torch.Tensor:  # the MPNCOV name
    """MPNCOV covariance pooling: (B, d, H, W) -> (B, d, d) as ``x I_hat x^T`` with the centring matrix.

    ``I_hat`` is built in float32 as upstream, or in float64 for a float64 input (upstream rounds it to
    float32 first, which a float64 comparison would see)."""
    batch_size, dim, h, w = x.shape
    m = h * w
    x = x.reshape(batch_size, dim, m)
    kw = dict(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    i_hat = (-1.0 / m / m) * torch.ones(m, m, **kw) + (1.0 / m) * torch.eye(m, m, **kw)
    i_hat = i_hat.view(1, m, m).repeat(batch_size, 1, 1).type(x.dtype)
    return x.bmm(i_hat).bmm(x.transpose(1, 2))


def _chan_att(self, out: torch.Tensor) -> torch.Tensor:
    """The official ``chan_att`` order: relu_normal -> conv_for_DR -> bn_for_DR -> relu -> covariance ->
    row_bn -> row_conv_group -> fc_adapt_channels -> sigmoid (no activation after the row conv).
    Options (not upstream): ``pre_act=False`` skips relu_normal, ``row_relu=True`` adds a ReLU after
    the row conv."""
    if self.pre_act:
        out = self.relu_normal(out)
    out = self.conv_for_DR(out)
    out = self.bn_for_DR(out)
    out = self.relu(out)
    out = CovpoolLayer(out)  # B, d, d
    out = out.view(out.size(0), out.size(1), out.size(2), 1).contiguous()
    out = self.row_bn(out)
    out = self.row_conv_group(out)  # B, 4d, 1, 1
    if self.row_relu:
        out = self.relu(out)
    out = self.fc_adapt_channels(out)  # B, C, 1, 1
    return self.sigmoid(out)


def _gsop_parts(
    module: nn.Module, channels: int, dim: int, stride: int, pre_act: bool = True, row_relu: bool = False
) -> None:
    module.ch_dim = dim
    module.pre_act, module.row_relu = pre_act, row_relu
    module.conv_for_DR = nn.Conv2d(channels, dim, kernel_size=1, stride=stride, bias=True)
    module.bn_for_DR = nn.BatchNorm2d(dim)
    module.row_bn = nn.BatchNorm2d(dim)
    # the row-wise convolution is a grouped convolution
    module.row_conv_group = nn.Conv2d(dim, 4 * dim, kernel_size=(dim, 1), groups=dim, bias=True)
    module.fc_adapt_channels = nn.Conv2d(4 * dim, channels, kernel_size=1, groups=1, bias=True)
    module.sigmoid = nn.Sigmoid()


class GSoP(nn.Module):
    """The official GSoP channel attention (``chan_att`` of the GSoP ResNet bottleneck) as a module."""

    def __init__(
        self, in_channels: int, dim: int, *, pre_act: bool = True, dr_stride: int = 1, row_relu: bool = False
    ) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.relu_normal = nn.ReLU(inplace=False)
        _gsop_parts(self, in_channels, dim, dr_stride, pre_act, row_relu)

    chan_att = _chan_att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.chan_att(x)


class Bottleneck(nn.Module):
    """The GSoP ResNet bottleneck: conv1/bn1 .. conv3/bn3, then (``attention='1'``) ``out * chan_att(out)``,
    the residual and a ReLU. ``conv_for_DR`` has stride 2 when ``planes <= 64``, as upstream."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: str = "0",
        att_dim: int = 128,
    ) -> None:
        super().__init__()
        self.dimDR = att_dim
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.relu_normal = nn.ReLU(inplace=False)
        if attention == "1":
            _gsop_parts(self, planes * self.expansion, att_dim, 1 if planes > 64 else 2)
        self.downsample = downsample
        self.stride = stride
        self.attention = attention

    chan_att = _chan_att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        if self.attention == "1":  # channel attention, the GSoP default mode
            pre_att = out
            att = self.chan_att(out)
            out = pre_att * att
        out += residual
        return self.relu(out)


# --- SKNet, the widely used PyTorch port -------------------------------------------------------------------
class SKConv(nn.Module):
    """SK convolution as the common PyTorch port: kernels 3, 5, ...; ``Linear`` fuse and select layers."""

    def __init__(self, features: int, M: int = 2, G: int = 32, r: int = 16, stride: int = 1, L: int = 32) -> None:
        super().__init__()
        d = max(int(features / r), L)
        self.M = M
        self.features = features
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(features, features, kernel_size=3 + i * 2, stride=stride, padding=1 + i, groups=G),
                nn.BatchNorm2d(features),
                nn.ReLU(inplace=False),
            )
            for i in range(M)
        )
        self.fc = nn.Linear(features, d)
        self.fcs = nn.ModuleList(nn.Linear(d, features) for _ in range(M))
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feas = torch.stack([conv(x) for conv in self.convs], dim=1)  # B, M, C, H, W
        fea_u = torch.sum(feas, dim=1)
        fea_s = fea_u.mean(-1).mean(-1)
        fea_z = self.fc(fea_s)
        attention_vectors = torch.stack([fc(fea_z) for fc in self.fcs], dim=1)  # B, M, C
        attention_vectors = self.softmax(attention_vectors).unsqueeze(-1).unsqueeze(-1)
        return (feas * attention_vectors).sum(dim=1)
