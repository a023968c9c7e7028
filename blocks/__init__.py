"""Reference PyTorch blocks, following the papers and official repositories.

Each block calls the dynamic-kernel ops of :mod:`attn_export.plugins`; none of them knows about
export backends.
"""

from attn_export.blocks.gsop import GSoPBlock
from attn_export.blocks.involution import Involution2d
from attn_export.blocks.odconv import ODConv2d
from attn_export.blocks.outlook import OutlookAttention
from attn_export.blocks.skconv import SKConv

__all__ = ["GSoPBlock", "Involution2d", "ODConv2d", "OutlookAttention", "SKConv"]
