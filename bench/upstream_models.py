"""Whole-model stand-ins of the six families of issue 19, for ``attn-export bench MODEL.pt`` only.

Written here afresh with the upstream structure (class and attribute names, layer order, widths, depths,
strides), not copied; weights are random, BatchNorm statistics calibrated on random images (so the
activations keep a trained network's scale and the parity checks mean something):

==========================  ==================================================================================
name                        upstream it stands in for
==========================  ==================================================================================
``volo_d1_224``             sail-sg/volo ``volo_d1`` (= timm ``volo_d1_224``): conv stem + 8x8 patches, 4 Outlookers
                            (dim 192, 6 heads, stride-2 outlook attention) at 28x28, 14 Transformers (dim 384,
                            12 heads) at 14x14, 2 class-attention blocks, token head + 0.5 * max of the aux head
``skresnet18``              timm ``skresnet18``: ResNet-18 layout, ``SelectiveKernelBasic`` (SK conv1 with the input
                            split across two 3x3 paths, dilations 1 and 2), ``rd_ratio=1/8, rd_divisor=16``
``skresnext50_32x4d``       timm ``skresnext50_32x4d``: ResNet-50 layout, ``SelectiveKernelBottleneck`` with
                            cardinality 32, base width 4, ``rd_ratio=1/16, rd_divisor=32``, no input split
``od_resnet18``             OSVAI/ODConv ``od_resnet18``: ResNet-18 whose 3x3 convolutions are ``ODConv2d``
                            (reduction 1/16, ``kernel_num=1``), plain stem, downsample and fc (dropout 0.1)
``rednet26``                d-li14/involution ``RedNet(depth=26)``: stem conv - involution(3) - conv, bottlenecks
                            (1, 2, 4, 1) whose 3x3 is ``involution(mid, 7, stride)``, GAP + fc head
``gsop_resnet50``           ZilinGao GSoP-Net: ResNet-50 with the ``chan_att`` GSoP attention (``att_dim=128``) in
                            every bottleneck; average-pooled head (the variant without the final covariance pooling)
==========================  ==================================================================================

The official ODConv, involution, outlook attention and GSoP bottleneck come from
:mod:`attn_export.bench.upstream`; the timm SelectiveKernel and the model skeletons are here.

``python -m attn_export.bench.upstream_models DIR [NAME ...]`` writes each as a pickled module
``DIR/NAME.pt`` (load it with ``--trust-checkpoint``; input 3x224x224).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from attn_export.bench import upstream as U

#: Input shape (C, H, W) of every stand-in (ImageNet at 224).
INPUT_SHAPE = (3, 224, 224)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: to a multiple of ``divisor``, never below ``round_limit`` of ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


# --- timm layers ---------------------------------------------------------------------------------------------
class ConvNormAct(nn.Module):
    """timm ``ConvNormAct``: conv (no bias, 'same'-style padding) -> BatchNorm -> optional ReLU."""

    def __init__(self, cin, cout, kernel_size=1, stride=1, dilation=1, groups=1, apply_act=True) -> None:
        super().__init__()
        padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2  # timm get_padding
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SelectiveKernelAttn(nn.Module):
    """timm: sum the paths, pool, 1x1 reduce + BN + ReLU, 1x1 select to ``num_paths * channels``, softmax."""

    def __init__(self, channels: int, num_paths: int = 2, attn_channels: int = 32) -> None:
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU(inplace=True)
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1, bias=False)

    def forward(self, x):
        x = x.sum(1).mean((2, 3), keepdim=True)
        x = self.fc_select(self.act(self.bn(self.fc_reduce(x))))
        b, c, h, w = x.shape
        x = x.view(b, self.num_paths, c // self.num_paths, h, w)
        return torch.softmax(x, dim=1)


class SelectiveKernel(nn.Module):
    """timm ``SelectiveKernel``: 3x3 paths with dilations (``keep_3x3``), optionally on splits of the input."""

    def __init__(
        self,
        in_channels,
        out_channels=None,
        kernel_size=None,
        stride=1,
        dilation=1,
        groups=1,
        rd_ratio=1.0 / 16,
        rd_channels=None,
        rd_divisor=8,
        keep_3x3=True,
        split_input=True,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        kernel_size = kernel_size or [3, 5]
        if keep_3x3:
            dilation = [dilation * (k - 1) // 2 for k in kernel_size]
            kernel_size = [3] * len(kernel_size)
        else:
            dilation = [dilation] * len(kernel_size)
        self.num_paths = len(kernel_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.split_input = split_input
        if self.split_input:
            in_channels = in_channels // self.num_paths
        groups = min(out_channels, groups)
        self.paths = nn.ModuleList(
            ConvNormAct(in_channels, out_channels, k, stride, d, groups)
            for k, d in zip(kernel_size, dilation, strict=True)
        )
        attn_channels = rd_channels or make_divisible(out_channels * rd_ratio, divisor=rd_divisor)
        self.attn = SelectiveKernelAttn(out_channels, self.num_paths, attn_channels)

    def forward(self, x):
        if self.split_input:
            x_split = torch.split(x, self.in_channels // self.num_paths, 1)
            x_paths = [op(x_split[i]) for i, op in enumerate(self.paths)]
        else:
            x_paths = [op(x) for op in self.paths]
        x = torch.stack(x_paths, dim=1)
        x = x * self.attn(x)
        return torch.sum(x, dim=1)


class SelectiveKernelBasic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64, sk_kwargs=None):
        super().__init__()
        self.conv1 = SelectiveKernel(inplanes, planes, stride=stride, **(sk_kwargs or {}))
        self.conv2 = ConvNormAct(planes, planes * self.expansion, 3, apply_act=False)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.conv2(self.conv1(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act(x)


class SelectiveKernelBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64, sk_kwargs=None):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        self.conv1 = ConvNormAct(inplanes, width, 1)
        self.conv2 = SelectiveKernel(width, width, stride=stride, groups=cardinality, **(sk_kwargs or {}))
        self.conv3 = ConvNormAct(width, planes * self.expansion, 1, apply_act=False)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x
        x = self.conv3(self.conv2(self.conv1(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act(x)


class ResNet(nn.Module):
    """The torchvision/timm ResNet skeleton: 7x7 stem, max pool, four stages, average pool, fc.

    ``make_block(inplanes, planes, stride, downsample)`` builds one block (its class's ``expansion``
    sets the widths); the downsample is a strided 1x1 conv + BN."""

    def __init__(self, block: type, layers, make_block: Callable, num_classes=1000, drop_rate=0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    down = nn.Sequential(
                        nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                blocks.append(make_block(inplanes, planes, stride if j == 0 else 1, down))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.drop(torch.flatten(self.avgpool(x), 1)))


def skresnet18() -> nn.Module:
    sk = dict(rd_ratio=1 / 8, rd_divisor=16, split_input=True)
    return ResNet(SelectiveKernelBasic, (2, 2, 2, 2), lambda i, p, s, d: SelectiveKernelBasic(i, p, s, d, sk_kwargs=sk))


def skresnext50_32x4d() -> nn.Module:
    sk = dict(rd_ratio=1 / 16, rd_divisor=32, split_input=False)
    return ResNet(
        SelectiveKernelBottleneck,
        (3, 4, 6, 3),
        lambda i, p, s, d: SelectiveKernelBottleneck(i, p, s, d, cardinality=32, base_width=4, sk_kwargs=sk),
    )


# --- OSVAI od_resnet -------------------------------------------------------------------------------------------
class ODBasicBlock(nn.Module):
    """OSVAI ``BasicBlock`` (od_resnet.py): ``odconv3x3`` - BN - ReLU - ``odconv3x3`` - BN, residual, ReLU."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, reduction=0.0625, kernel_num=1) -> None:
        super().__init__()
        self.conv1 = U.ODConv2d(inplanes, planes, 3, stride, 1, reduction=reduction, kernel_num=kernel_num)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = U.ODConv2d(planes, planes, 3, 1, 1, reduction=reduction, kernel_num=kernel_num)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def od_resnet18() -> nn.Module:
    return ResNet(ODBasicBlock, (2, 2, 2, 2), lambda i, p, s, d: ODBasicBlock(i, p, s, d), drop_rate=0.1)


# --- d-li14 RedNet ---------------------------------------------------------------------------------------------
class RedBottleneck(nn.Module):
    """RedNet's bottleneck (mmcls ``Bottleneck`` with ``conv2 = involution(mid, 7, stride)``)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(planes)
        self.conv2 = U.involution(planes, 7, stride)
        self.norm2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class RedNet(ResNet):
    """RedNet-26: the involution stem (conv3x3/2 - involution(3) - BN - ReLU - conv3x3), max pool, stages
    (1, 2, 4, 1) of :class:`RedBottleneck`, GAP + fc (the mmcls ImageClassifier head)."""

    def __init__(self, num_classes=1000, stem_channels=64) -> None:
        super().__init__(RedBottleneck, (1, 2, 4, 1), RedBottleneck, num_classes)
        half = stem_channels // 2
        del self.conv1, self.bn1, self.relu
        self.stem = nn.Sequential(
            U._ConvModule(3, half),
            U.involution(half, 3, 1),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            U._ConvModule(half, stem_channels),
        )
        # mmcls ConvModule with a 3x3 kernel: the stand-in's _ConvModule is 1x1, so swap in 3x3 convs
        self.stem[0].conv = nn.Conv2d(3, half, 3, 2, 1, bias=False)
        self.stem[4].conv = nn.Conv2d(half, stem_channels, 3, 1, 1, bias=False)

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def rednet26() -> nn.Module:
    return RedNet()


# --- GSoP ResNet-50 --------------------------------------------------------------------------------------------
def gsop_resnet50() -> nn.Module:
    return ResNet(U.Bottleneck, (3, 4, 6, 3), lambda i, p, s, d: U.Bottleneck(i, p, s, d, attention="1"))


# --- sail-sg VOLO ----------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Outlooker(nn.Module):
    def __init__(self, dim, kernel_size, padding, stride, num_heads, mlp_ratio=3.0, qkv_bias=False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = U.OutlookAttention(dim, num_heads, kernel_size, padding, stride, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VoloAttention(nn.Module):
    """VOLO's ``Attention`` (multi-head self-attention on (B, H, W, C), explicit softmax(q k^T) v)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(x)


class Transformer(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VoloAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassAttention(nn.Module):
    """Class attention (CaiT-style): only the class token queries all tokens."""

    def __init__(self, dim, num_heads=8, qkv_bias=False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kv = nn.Linear(dim, self.head_dim * num_heads * 2, bias=qkv_bias)
        self.q = nn.Linear(dim, self.head_dim * num_heads, bias=qkv_bias)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)

    def forward(self, x):
        B, N, _ = x.shape
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        q = self.q(x[:, :1, :]).reshape(B, self.num_heads, 1, self.head_dim)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        cls_embed = (attn @ v).transpose(1, 2).reshape(B, 1, self.head_dim * self.num_heads)
        return self.proj(cls_embed)


class ClassBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        cls_embed = x[:, :1]
        cls_embed = cls_embed + self.attn(self.norm1(x))
        cls_embed = cls_embed + self.mlp(self.norm2(cls_embed))
        return torch.cat([cls_embed, x[:, 1:]], dim=1)


class PatchEmbed(nn.Module):
    """VOLO's stem: three conv-BN-ReLU (7x7/2, 3x3, 3x3) at ``hidden_dim``, then a 4x4/4 projection."""

    def __init__(self, patch_size=8, stem_stride=2, in_chans=3, hidden_dim=64, embed_dim=192) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, 7, stem_stride, 3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        k = patch_size // stem_stride
        self.proj = nn.Conv2d(hidden_dim, embed_dim, kernel_size=k, stride=k)

    def forward(self, x):
        return self.proj(self.conv(x))


class Downsample(nn.Module):
    def __init__(self, in_dim, out_dim, patch_size=2) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VOLO(nn.Module):
    """VOLO-D1 (layers 4, 4, 8, 2; dims 192, 384, 384, 384; heads 6, 12, 12, 12; mlp ratio 3)."""

    def __init__(self, img_size=224, num_classes=1000, layers=(4, 4, 8, 2), dims=(192, 384, 384, 384)) -> None:
        super().__init__()
        heads = (6, 12, 12, 12)
        self.patch_embed = PatchEmbed(embed_dim=dims[0])
        grid = img_size // 8 // 2
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, grid, grid, dims[-1]))
        outlookers = (Outlooker(dims[0], 3, 1, 2, heads[0], 3.0) for _ in range(layers[0]))
        stages: list[nn.Module] = [nn.Sequential(*outlookers)]
        stages.append(Downsample(dims[0], dims[1], 2))
        for i in range(1, 4):
            stages.append(nn.Sequential(*(Transformer(dims[i], heads[i], 3.0) for _ in range(layers[i]))))
        self.network = nn.ModuleList(stages)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dims[-1]))
        self.post_network = nn.ModuleList(ClassBlock(dims[-1], heads[-1], 3.0) for _ in range(2))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)
        self.aux_head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # B, H, W, C
        for idx, block in enumerate(self.network):
            if idx == 2:
                x = x + self.pos_embed
            x = block(x)
        B, C = x.shape[0], x.shape[-1]
        x = x.reshape(B, -1, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        for block in self.post_network:
            x = block(x)
        x = self.norm(x)
        out = self.head(x[:, 0])
        aux = self.aux_head(x[:, 1:])
        return out + 0.5 * aux.max(1)[0]


def volo_d1_224() -> nn.Module:
    return VOLO()


#: name -> constructor, in the issue's table order.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "volo_d1_224": volo_d1_224,
    "skresnet18": skresnet18,
    "od_resnet18": od_resnet18,
    "rednet26": rednet26,
    "gsop_resnet50": gsop_resnet50,
    "skresnext50_32x4d": skresnext50_32x4d,
}


def calibrate_norms(model: nn.Module, input_shape=INPUT_SHAPE, batch: int = 4, seed: int = 0) -> nn.Module:
    """Give every BatchNorm over feature maps the statistics of the activations it sees on random images
    (one pass with batch statistics and a cumulative average), and every BatchNorm a non-trivial affine
    transform; returns ``model`` in eval mode.

    BatchNorms on pooled 1x1 inputs (the attention branches of ODConv and SK) keep random statistics:
    the batch variance of pooled random images is nearly zero, and calibrating on it would saturate
    the attention in eval mode."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    pooled: set[int] = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: pooled.add(id(mod)) if args[0][0, 0].numel() == 1 else None)
        for m in norms
    ]
    model.eval()
    with torch.no_grad():
        sample = torch.randn((batch, *input_shape), generator=g)
        model(sample)
        for h in hooks:
            h.remove()
        for m in norms:
            n = m.num_features
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            if id(m) in pooled:
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            else:
                m.reset_running_stats()
                m.momentum = None
                m.train()
        model(sample)
        for m in norms:
            m.momentum = 0.1
    model.eval()
    return model


def build(name: str, seed: int = 0) -> nn.Module:
    """The stand-in ``name`` (see :data:`MODELS`) with seeded weights and calibrated norms, in eval mode."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return calibrate_norms(MODELS[name](), seed=seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the whole-model stand-ins as pickled modules DIR/NAME.pt.")
    p.add_argument("dir", type=Path)
    p.add_argument("names", nargs="*", default=list(MODELS), help=f"default: all of {', '.join(MODELS)}")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    from attn_export.bench import upstream_models  # not __main__: the pickles name the package's classes
    from attn_export.files import atomic_path

    args.dir.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        model = upstream_models.build(name)
        with atomic_path(args.dir / f"{name}.pt") as tmp:
            torch.save(model, tmp)
        print(f"{args.dir / name}.pt: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
