"""A small classifier that uses all five blocks once: the export pipeline's test bed and demo.

``stem (3->32, /2) -> Involution2d -> conv (32->64, /2) -> ODConv2d -> SKConv -> OutlookAttention
-> GSoPBlock -> global average pool -> Linear``. Input (B, 3, H, W) with H, W divisible by 4.
"""

from __future__ import annotations

from torch import nn

from attn_export.blocks.gsop import GSoPBlock
from attn_export.blocks.involution import Involution2d
from attn_export.blocks.odconv import ODConv2d
from attn_export.blocks.outlook import OutlookAttention
from attn_export.blocks.skconv import SKConv


def conv_bn_act(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ChannelsLast(nn.Module):
    """Runs a channels-last block (B, H, W, C) inside a channels-first network, with a residual."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MixedNet(nn.Module):
    """All five blocks in one small network; ``num_classes`` logits per image."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w2 = 2 * width
        self.stem = conv_bn_act(3, width, 2)
        self.involution = Involution2d(width, kernel_size=7, group_channels=16)
        self.down = conv_bn_act(width, w2, 2)
        self.odconv = ODConv2d(w2, w2, 3, padding=1, kernel_num=4)
        self.skconv = SKConv(w2, groups=min(32, w2 // 2))
        self.outlook = ChannelsLast(OutlookAttention(w2, num_heads=2))
        self.gsop = GSoPBlock(w2, mid_channels=32)
        self.head = nn.Linear(w2, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.involution(x)
        x = self.down(x)
        x = self.odconv(x)
        x = self.skconv(x)
        x = self.outlook(x)
        x = self.gsop(x)
        return self.head(x.mean((2, 3)))
