"""Whether an op's CUDA kernel takes the Triton path (imports neither torch nor Triton at import time)."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def _kernels_available() -> bool:
    """Whether Triton can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_cuda_kernel(*tensors) -> bool:
    """Whether the CUDA kernels should take the Triton path for these inputs.

    Triton kernels cover fp32/fp16/bf16 with every input on one device; anything else (float64, for
    gradcheck) takes the plain-torch reference. Mixed devices are an error.
    """
    import torch

    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    dtypes = {t.dtype for t in tensors}
    return _kernels_available() and len(dtypes) == 1 and dtypes <= {torch.float32, torch.float16, torch.bfloat16}
