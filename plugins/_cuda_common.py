"""Pieces shared by the ops' Triton kernels and launchers (imports torch and Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attn_export.plugins.registry import NUM_WARPS

__all__ = ["NUM_WARPS", "SUPPORTED", "contiguous_pair", "program_tile"]

#: The dtypes the Triton kernels take (every input in one of them).
SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def contiguous_pair(name: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor):
    """``a`` and ``b`` contiguous, after checking they share one of :data:`SUPPORTED`."""
    if a.dtype not in SUPPORTED or b.dtype != a.dtype:
        raise TypeError(f"{name}: {names[0]} and {names[1]} must share one of {SUPPORTED}, got {a.dtype} and {b.dtype}")
    return a.contiguous(), b.contiguous()


@triton.jit
def program_tile(n_inner, n_mid, n_group):
    """The 1-D grid's program id split as ``inner + n_inner * (mid + n_mid * outer)``, with ``outer`` a
    ``sample * n_group + group`` index: ``(inner, mid, outer, sample, group)``, the last three int64 (for
    base offsets)."""
    pid = tl.program_id(0)
    inner = pid % n_inner
    rest = pid // n_inner
    mid = rest % n_mid
    outer = (rest // n_mid).to(tl.int64)
    return inner, mid, outer, outer // n_group, outer % n_group
