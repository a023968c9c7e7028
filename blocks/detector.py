"""A compact anchor-free one-stage detector built around the five blocks (the shapes demo model).

Layout, for an input of H x W (both divisible by 32; default 320 x 320, letterboxed)::

    stem     conv 3x3/2 -> conv 3x3/2                                   stride 4
    stage 2  conv 3x3/2, Involution2d and ODConv2d (each residual),      stride 8  -> C3
             a depthwise-separable (DS) block
    stage 3  conv 3x3/2, SKConv (residual), DS block                     stride 16 -> C4
    stage 4  conv 3x3/2, OutlookAttention (channels-last, pre-norm,      stride 32 -> C5
             residual), DS block, GSoPBlock
    neck     FPN (top-down) + PAN (bottom-up) over C3, C4, C5
    head     per level, decoupled: a classification branch and a box branch (two depthwise-
             separable convs each), anchor-free: one prediction per feature-map cell

Every cell of the three levels (strides 8, 16, 32) predicts the distances from its centre
``((j + 0.5) * stride, (i + 0.5) * stride)`` to the four sides of a box (``softplus * stride``) and
one logit per class. :meth:`ShapesDetector.forward` decodes them, so an exported graph outputs ready
boxes; :meth:`ShapesDetector.forward_raw` gives the undecoded outputs the loss needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attn_export.blocks.gsop import GSoPBlock
from attn_export.blocks.involution import Involution2d
from attn_export.blocks.odconv import ODConv2d
from attn_export.blocks.outlook import OutlookAttention
from attn_export.blocks.skconv import SKConv

STRIDES = (8, 16, 32)


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.SiLU() if act else nn.Identity(),
        )


class DSConv(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, each with BN and SiLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(ConvBNAct(cin, cin, 3, stride, groups=cin), ConvBNAct(cin, cout, 1))


class DSBlock(nn.Module):
    """Residual depthwise-separable block: ``x + pw(dw(pw(x)))`` with an expansion."""

    def __init__(self, channels: int, expand: int = 2) -> None:
        super().__init__()
        mid = channels * expand
        self.body = nn.Sequential(
            ConvBNAct(channels, mid, 1), ConvBNAct(mid, mid, 3, groups=mid), ConvBNAct(mid, channels, 1, act=False)
        )

    def forward(self, x):
        return x + self.body(x)


class Residual(nn.Module):
    """``x + act(bn(block(x)))`` for a channels-first block that keeps the shape."""

    def __init__(self, block: nn.Module, channels: int) -> None:
        super().__init__()
        self.block = block
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.bn(self.block(x)))


class OutlookLayer(nn.Module):
    """Pre-norm outlook attention on a channels-first map: ``x + outlook(norm(x))`` (VOLO's layout)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = OutlookAttention(channels, num_heads=num_heads, kernel_size=3, padding=1)

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        return x + self.attn(self.norm(y)).permute(0, 3, 1, 2)


class Head(nn.Module):
    """Decoupled head for one level: class logits (B, C, h, w) and raw box distances (B, 4, h, w)."""

    def __init__(self, cin: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = ConvBNAct(cin, channels, 1)
        self.cls = nn.Sequential(DSConv(channels, channels), DSConv(channels, channels))
        self.box = nn.Sequential(DSConv(channels, channels), DSConv(channels, channels))
        self.cls_out = nn.Conv2d(channels, num_classes, 1)
        self.box_out = nn.Conv2d(channels, 4, 1)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01
        nn.init.normal_(self.box_out.weight, std=0.01)
        nn.init.constant_(self.box_out.bias, math.log(math.e - 1) + 0.5)  # softplus -> about 1.5 strides

    def forward(self, x):
        x = self.stem(x)
        return self.cls_out(self.cls(x)), self.box_out(self.box(x))


class ShapesDetector(nn.Module):
    """Anchor-free detector using Involution2d, ODConv2d, SKConv, OutlookAttention and GSoPBlock.

    ``forward(images)`` takes (B, 3, H, W) floats in [0, 1] (RGB, letterboxed; H and W divisible by
    32) and returns ONE tensor of shape (B, N, 4 + num_classes), ``N = sum over strides 8, 16, 32 of
    (H / s) * (W / s)`` (2100 at 320 x 320): for each candidate, ``x1, y1, x2, y2`` in input pixels,
    then one sigmoid score in [0, 1] per class. Candidates are ordered level by level (stride 8
    first), row-major within a level. No NMS is applied (see :mod:`attn_export.detection.postprocess`).
    """

    def __init__(self, num_classes: int = 4, width: int = 16, input_size: int = 320) -> None:
        super().__init__()
        if width % 8:
            raise ValueError(f"ShapesDetector: width must be a multiple of 8, got {width}")
        self.num_classes = num_classes
        self.width = width
        self.input_size = input_size
        c1, c2, c3, c4, c5 = width, 2 * width, 4 * width, 6 * width, 8 * width
        neck = 4 * width
        self.stem = nn.Sequential(ConvBNAct(3, c1, 3, 2), ConvBNAct(c1, c2, 3, 2))
        self.stage2 = nn.Sequential(
            ConvBNAct(c2, c3, 3, 2),
            Residual(Involution2d(c3, kernel_size=7, reduction=4, group_channels=16), c3),
            Residual(ODConv2d(c3, c3, 3, padding=1, kernel_num=4), c3),
            DSBlock(c3),
        )
        self.stage3 = nn.Sequential(
            ConvBNAct(c3, c4, 3, 2), Residual(SKConv(c4, groups=c4 // 8, min_dim=16), c4), DSBlock(c4)
        )
        self.stage4 = nn.Sequential(
            ConvBNAct(c4, c5, 3, 2),
            OutlookLayer(c5, num_heads=4),
            DSBlock(c5),
            GSoPBlock(c5, mid_channels=32, row_relu=True),  # trained with the ReLU after the row conv
        )
        # FPN (top-down) and PAN (bottom-up)
        self.lat5 = ConvBNAct(c5, neck, 1)
        self.lat4 = ConvBNAct(c4, neck, 1)
        self.lat3 = ConvBNAct(c3, neck, 1)
        self.td4 = DSConv(neck, neck)
        self.td3 = DSConv(neck, neck)
        self.down3 = DSConv(neck, neck, stride=2)
        self.bu4 = DSConv(neck, neck)
        self.down4 = DSConv(neck, neck, stride=2)
        self.bu5 = DSConv(neck, neck)
        self.heads = nn.ModuleList(Head(neck, neck, num_classes) for _ in STRIDES)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The neck's outputs at strides 8, 16 and 32."""
        c3 = self.stage2(self.stem(x))
        c4 = self.stage3(c3)
        c5 = self.stage4(c4)
        p5 = self.lat5(c5)
        p4 = self.td4(self.lat4(c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest"))
        p3 = self.td3(self.lat3(c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest"))
        n4 = self.bu4(p4 + self.down3(p3))
        n5 = self.bu5(p5 + self.down4(n4))
        return [p3, n4, n5]

    @staticmethod
    def points(shapes: list[tuple[int, int]], device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres (N, 2) as ``(x, y)`` in input pixels and their strides (N,)."""
        pts, strides = [], []
        for (h, w), s in zip(shapes, STRIDES, strict=True):
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            pts.append(torch.stack([gx, gy], -1).reshape(-1, 2))
            strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
        return torch.cat(pts), torch.cat(strides)

    def forward_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Undecoded outputs: class logits (B, N, C), box distances ``l, t, r, b`` in input pixels
        (B, N, 4), cell centres (N, 2) and strides (N,)."""
        feats = self.features(x)
        logits, dists, shapes = [], [], []
        for f, head, s in zip(feats, self.heads, STRIDES, strict=True):
            cls, box = head(f)
            shapes.append((f.shape[2], f.shape[3]))
            # decoded in fp32 or wider: bf16 spaces coordinates above 256 px 2 px apart (no-ops in fp32)
            wide = torch.promote_types(box.dtype, torch.float32)
            logits.append(cls.flatten(2).to(wide))
            dists.append(F.softplus(box.flatten(2).to(wide)) * s)
        logits = torch.cat(logits, 2).transpose(1, 2)
        dists = torch.cat(dists, 2).transpose(1, 2)
        pts, strides = self.points(shapes, x.device, dists.dtype)
        return logits, dists, pts, strides

    @staticmethod
    def decode(dists: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``l, t, r, b`` distances (..., N, 4) from centres (N, 2) -> ``x1, y1, x2, y2``."""
        return torch.cat([points - dists[..., :2], points + dists[..., 2:]], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, dists, pts, _ = self.forward_raw(x)
        return torch.cat([self.decode(dists, pts), logits.sigmoid()], -1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, width={self.width}, input_size={self.input_size}"
