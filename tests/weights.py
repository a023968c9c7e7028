"""Random weights for tests (one home for what six test modules each had a copy of).

``tests/`` is on ``sys.path`` (pytest puts the rootdir conftest's folder there), so test modules import
it as ``from weights import randomize_``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def randomize_(module: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Random parameters everywhere (scaled by fan-in), and BatchNorm affine parameters and running
    statistics that are not the identity, so that eval-mode BatchNorm matters. In place; returns ``module``.

    ``dtype`` is the dtype the numbers are drawn in (float64 draws give other numbers than float32
    draws from the same seed); they are then copied into the module's own dtype.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.rand(shape, generator=g, dtype=dtype)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=dtype)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(rand(m.weight.shape) + 0.5)
                m.bias.copy_(0.2 * randn(m.bias.shape))
                m.running_mean.copy_(0.2 * randn(m.running_mean.shape))
                m.running_var.copy_(rand(m.running_var.shape) + 0.5)
                continue
            for p in m.parameters(recurse=False):
                if p.dim() == 1:
                    p.copy_(0.2 * randn(p.shape))
                else:
                    # ODConv's 5-D weight is (kernel_num, Cout, Cin/g, k, k): its fan-in is Cin/g*k*k
                    fan_in = math.prod(p.shape[2:] if p.dim() == 5 else p.shape[1:])
                    p.copy_(randn(p.shape) / math.sqrt(fan_in))
    return module
