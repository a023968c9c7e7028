"""Tap geometry for the numpy references of the plugins (no torch).

Like :mod:`attn_export.plugins._taps`, every op is a loop over the ``k x k`` taps of strided slices
of a zero-padded array, never over pixels. Inputs of float32 or narrower are computed in float32 and
the result is cast back to the input dtype (what the TensorRT plugins do: fp16 in, fp32 accumulate,
fp16 out); float64 stays float64.
"""

from __future__ import annotations

import numpy as np

from attn_export.plugins._trt_names import NAMESPACE, VERSION


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a sliding window along one axis (the convolution formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def float_types(op: str, *arrays: np.ndarray) -> tuple[np.dtype, np.dtype]:
    """``(out dtype, accumulation dtype)`` of float inputs that share one dtype."""
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise TypeError(f"{op}: inputs must share one dtype, got {sorted(map(str, dtypes))}")
    (dtype,) = dtypes
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"{op}: inputs must be floating point, got {dtype}")
    return dtype, np.promote_types(dtype, np.float32)


def pad_hw(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Zero-pad the last two axes."""
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(ph, ph), (pw, pw)])


def window(xp: np.ndarray, r0: int, c0: int, counts: tuple[int, int], steps: tuple[int, int]) -> np.ndarray:
    """The strided view of padded ``xp`` (last two axes) that the tap starting at ``(r0, c0)`` reads."""
    return xp[
        ..., r0 : r0 + steps[0] * (counts[0] - 1) + 1 : steps[0], c0 : c0 + steps[1] * (counts[1] - 1) + 1 : steps[1]
    ]


def check_plugin(name: str, plugin_namespace, plugin_version) -> None:
    """What TensorRT's registry lookup does: a node must name our namespace and version (if any)."""
    if plugin_namespace is not None and plugin_namespace != NAMESPACE:
        raise ValueError(f"{name}: plugin_namespace {plugin_namespace!r} is not {NAMESPACE!r}")
    if plugin_version is not None and plugin_version != VERSION:
        raise ValueError(f"{name}: plugin_version {plugin_version!r} is not {VERSION!r}")
