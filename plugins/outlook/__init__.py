"""Outlook aggregation, the dynamic kernel of VOLO's Outlook Attention (Yuan et al., TPAMI 2022).

For each window centre ``n`` (an ``h x w`` grid, stride ``s``) and head ``m``, the ``k*k`` values
around it are mixed by that centre's ``(k*k, k*k)`` attention matrix, and the mixed windows are folded
back (summed where they overlap):

``out = fold(attn @ unfold(v))``

with the official code's layout: ``v`` is (B, C, H, W), channel ``c = m * (C / heads) + j``;
``attn`` is (B, heads, h*w, k*k, k*k), already softmaxed. No ``F.fold``, so no ``Col2Im`` on export.
"""

from attn_export.plugins.outlook.op import outlook_aggregate

__all__ = ["outlook_aggregate"]
