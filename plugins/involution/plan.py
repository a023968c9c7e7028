"""Launch plan of the involution kernel (``cuda_kernel._involution2d_fwd``), shared by the op's CUDA
launcher and the TensorRT plugin's AOT implementation.

Written on shape arithmetic (:mod:`attn_export.plugins._shape_expr`): with ints it is the launcher's
plan, with ``tensorrt.plugin`` shape expressions the AOT one (grid and scalars symbolic in the batch).
"""

from __future__ import annotations

from attn_export.plugins._shape_expr import cdiv, conv_out, next_pow2
from attn_export.plugins.registry import BY_OP

PLUGIN_NAME = BY_OP["involution2d"].plugin
#: The kernel's int32 arguments between the pointers, in its order.
SCALARS = ("C", "H", "W", "Ho", "Wo", "G", "CG", "n_pblk", "n_cblk")


def check_attributes(kernel_size: int, stride: int, padding: int, dilation: int) -> None:
    if kernel_size < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"{PLUGIN_NAME}: need kernel_size, stride, dilation >= 1 and padding >= 0, got kernel_size={kernel_size}, "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )


def output_shape(x, weight, kernel_size: int, stride: int, padding: int, dilation: int) -> tuple:
    """(B, C, Ho, Wo) from the shapes (shape expressions or ints) of ``x`` and ``weight``."""
    check_attributes(kernel_size, stride, padding, dilation)
    ho = conv_out(x[2], kernel_size, stride, padding, dilation)
    wo = conv_out(x[3], kernel_size, stride, padding, dilation)
    return (x[0], x[1], ho, wo)


def blocks(cg: int | None, howo: int | None) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)`` for ``cg`` channels per group and ``howo`` output pixels; None (a dynamic
    size) takes the largest."""
    block_p = 128 if howo is None else min(max(next_pow2(howo), 16), 128)
    block_c = min(32 if cg is None else next_pow2(cg), max(4096 // block_p, 1), 32)
    return block_c, block_p


def constexprs(kernel_size: int, stride: int, padding: int, dilation: int, block_c: int, block_p: int) -> dict:
    """The kernel's constexpr arguments."""
    same = stride == 1 and 2 * padding == dilation * (kernel_size - 1)  # the output has the input's size
    return {
        "STRIDE": stride,
        "PAD": padding,
        "DIL": dilation,
        "K": kernel_size,
        "BLOCK_C": block_c,
        "BLOCK_P": block_p,
        "SAME": same,
    }


def launch_plan(x, weight, kernel_size: int, stride: int, padding: int, dilation: int, block_c: int, block_p: int):
    """``(grid, scalars, constexprs)`` of the kernel for shapes of ``x`` and ``weight`` (a 1-D grid)."""
    b, c, h, w = x[0], x[1], x[2], x[3]
    g, ho, wo = weight[1], weight[3], weight[4]
    cg = c // g
    n_pblk = cdiv(ho * wo, block_p)
    n_cblk = cdiv(cg, block_c)
    grid = b * g * n_pblk * n_cblk
    scalars = (c, h, w, ho, wo, g, cg, n_pblk, n_cblk)
    return grid, scalars, constexprs(kernel_size, stride, padding, dilation, block_c, block_p)
