"""Launch plan of the fixed-tile dynamic-convolution kernel (``cuda_kernel._dynamic_conv2d_fwd``), shared
by its CUDA launcher and the TensorRT plugin's AOT implementation.

Written on shape arithmetic (:mod:`attn_export.plugins._shape_expr`): with ints it is the launcher's
plan, with ``tensorrt.plugin`` shape expressions the AOT one (grid and scalars symbolic in the batch).
The kernel size is a compile-time constant of the kernel, so it is always given as ints.
"""

from __future__ import annotations

from collections.abc import Sequence

from attn_export.plugins._shape_expr import cdiv, conv_out, next_pow2
from attn_export.plugins.registry import BY_OP

PLUGIN_NAME = BY_OP["dynamic_conv2d"].plugin
#: The kernel's int32 arguments between the pointers, in its order.
SCALARS = ("CIN", "H", "W", "COUT", "HO", "WO", "GROUPS", "CIN_G", "COUT_G", "n_pblk", "n_coblk")


def pair(name: str, value: Sequence[int], low: int) -> tuple[int, int]:
    """Two ints (rows, columns) from a list/array attribute, each >= ``low``."""
    values = tuple(int(v) for v in value)
    if len(values) != 2 or min(values) < low:
        raise ValueError(f"{PLUGIN_NAME}: {name} must be two ints >= {low}, got {list(values)}")
    return values  # type: ignore[return-value]


def check_attributes(stride, padding, dilation, groups: int):
    """``(stride, padding, dilation)`` as int pairs, after checking them and ``groups``."""
    if int(groups) < 1:
        raise ValueError(f"{PLUGIN_NAME}: groups must be >= 1, got {groups}")
    return pair("stride", stride, 1), pair("padding", padding, 0), pair("dilation", dilation, 1)


def output_shape(x, weight, stride, padding, dilation, groups: int) -> tuple:
    """(B, Cout, Ho, Wo) from the shapes (shape expressions or ints) of ``x`` and ``weight``."""
    (sh, sw), (ph, pw), (dh, dw) = check_attributes(stride, padding, dilation, groups)
    ho = conv_out(x[2], weight[3], sh, ph, dh)
    wo = conv_out(x[3], weight[4], sw, pw, dw)
    return (x[0], weight[1], ho, wo)


def _block(n: int | None, lo: int, hi: int) -> int:
    return hi if n is None else min(max(next_pow2(n), lo), hi)


def blocks(cout_g: int | None, cin_g: int | None, howo: int | None) -> tuple[int, int, int]:
    """``(BLOCK_CO, BLOCK_K, BLOCK_P)`` (``tl.dot`` tiles >= 16); None (a dynamic size) takes the largest.
    ``BLOCK_K`` steps the reduction over (input channel, tap) in the weight's order: 16 (a group has
    ``cin_g * kH * kW`` of them; the tile stays 16 for any ``cin_g``). Tiles of 64 x 16 x 64 at most
    (``attn-export kernels``, B32 C256 28x28 k3, fp32 IEEE: 128 registers on sm_90, 159 on sm_80, no
    spill, estimated 0.062 of HBM against 0.043 at 64 x 16 x 32; 128 x 16 x 64 spills on sm_90)."""
    del cin_g  # the K tile is 16 whatever the channels; kept for the callers' (and the plan's) symmetry
    return _block(cout_g, 16, 64), 16, _block(howo, 16, 64)


def dot_precision(dtype: str) -> str | None:
    """``tl.dot`` precision: IEEE fp32 products for fp32 (not TF32), the backend default otherwise."""
    return "ieee" if dtype == "fp32" else None


def constexprs(stride, padding, dilation, kernel_hw, block_co: int, block_k: int, block_p: int, precision) -> dict:
    """The kernel's constexpr arguments (``stride``, ``padding``, ``dilation``, ``kernel_hw``: int pairs)."""
    (sh, sw), (ph, pw), (dh, dw), (kh, kw) = stride, padding, dilation, kernel_hw
    return {
        "SH": sh,
        "SW": sw,
        "PH": ph,
        "PW": pw,
        "DH": dh,
        "DW": dw,
        "KH": kh,
        "KW": kw,
        "BLOCK_CO": block_co,
        "BLOCK_K": block_k,
        "BLOCK_P": block_p,
        "DOT_PRECISION": precision,
    }


def launch_plan(
    x,
    weight,
    stride,
    padding,
    dilation,
    groups: int,
    kernel_hw: tuple[int, int],
    block_co: int,
    block_k: int,
    block_p: int,
    dot_precision: str | None,
):
    """``(grid, scalars, constexprs)`` of the kernel for shapes of ``x`` and ``weight`` (a 1-D grid);
    ``kernel_hw`` is the static (kH, kW)."""
    (sh, sw), (ph, pw), (dh, dw) = pairs = check_attributes(stride, padding, dilation, groups)
    groups = int(groups)
    kh, kw = (int(k) for k in kernel_hw)
    b, cin, h, w = x[0], x[1], x[2], x[3]
    cout, cin_g = weight[1], weight[2]
    ho = conv_out(h, kh, sh, ph, dh)
    wo = conv_out(w, kw, sw, pw, dw)
    cout_g = cout // groups
    n_pblk = cdiv(ho * wo, block_p)
    n_coblk = cdiv(cout_g, block_co)
    grid = b * groups * n_pblk * n_coblk
    scalars = (cin, h, w, cout, ho, wo, groups, cin_g, cout_g, n_pblk, n_coblk)
    return grid, scalars, constexprs(*pairs, (kh, kw), block_co, block_k, block_p, dot_precision)
