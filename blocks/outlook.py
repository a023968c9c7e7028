"""Outlook attention (Yuan et al., "VOLO: Vision Outlooker for Visual Recognition", TPAMI 2022;
official code: github.com/sail-sg/volo, ``models/volo.py``).

On a channels-last input (B, H, W, C): values ``v = Linear(x)``; for each window centre of a
``ceil(H / stride) x ceil(W / stride)`` grid, the (ceil-mode average-pooled) input predicts a
``(k*k) x (k*k)`` attention matrix per head (``Linear`` to ``k**4 * heads``, scaled, softmaxed); the
``k x k`` value windows are mixed by it and folded back (summed where they overlap); then ``proj``.

Differences from the official code:

- the unfold -> matmul -> fold is the :func:`attn_export.plugins.outlook_aggregate` op, so export
  needs no ``Col2Im`` (which TensorRT rejects) and eager needs no ``k*k``-fold fold buffer; the
  numbers are the same;
- the grid is checked against the unfold grid with a clear error (the official code fails in a
  reshape when ``kernel_size``, ``padding`` and ``stride`` do not give ``ceil(H / stride)``);
- parameter names are the official ones (``v``, ``attn``, ``proj``), so checkpoints load directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from attn_export.blocks._checks import check_divisible, check_input, check_positive
from attn_export.plugins import outlook_aggregate
from attn_export.plugins._taps import out_size


class OutlookAttention(nn.Module):
    """VOLO outlook attention on channels-last input (B, H, W, C) -> (B, H, W, C)."""

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
        name = type(self).__name__
        check_positive(name, dim=dim, num_heads=num_heads, kernel_size=kernel_size, stride=stride)
        check_divisible(name, "dim", dim, "num_heads", num_heads)
        if padding < 0:
            raise ValueError(f"{name}: padding must be >= 0, got {padding}")
        self.dim = dim
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size**4 * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        k, p, s = self.kernel_size, self.padding, self.stride
        grid = (out_size(height, k, s, p, 1), out_size(width, k, s, p, 1))
        pooled = (math.ceil(height / s), math.ceil(width / s))
        if grid != pooled:
            raise ValueError(
                f"{type(self).__name__}: kernel_size={k}, padding={p}, stride={s} give a {grid[0]}x{grid[1]} "
                f"window grid on a {height}x{width} input, but the pooled attention grid is "
                f"{pooled[0]}x{pooled[1]}; use padding=(kernel_size - 1) // 2 with an odd kernel_size"
            )
        return grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, "(B, H, W, C)", self.dim, 3)
        b, height, width, _ = x.shape
        h, w = self._grid(height, width)
        kk = self.kernel_size * self.kernel_size
        v = self.v(x).permute(0, 3, 1, 2)  # B, C, H, W
        a = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, h, w, C
        a = self.attn(a).reshape(b, h * w, self.num_heads, kk, kk).permute(0, 2, 1, 3, 4)
        a = self.attn_drop((a * self.scale).softmax(dim=-1))
        out = outlook_aggregate(v, a, self.kernel_size, self.padding, self.stride)
        return self.proj_drop(self.proj(out.permute(0, 2, 3, 1)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"padding={self.padding}, stride={self.stride}"
        )
