"""Launch plan of the outlook kernel (``cuda_kernel._outlook_aggregate_fwd``), shared by the op's CUDA
launcher and the TensorRT plugin's AOT implementation.

Written on shape arithmetic (:mod:`attn_export.plugins._shape_expr`): with ints it is the launcher's
plan, with ``tensorrt.plugin`` shape expressions the AOT one (grid and scalars symbolic in the batch).
"""

from __future__ import annotations

from attn_export.plugins._shape_expr import cdiv, conv_out, next_pow2
from attn_export.plugins.registry import BY_OP

PLUGIN_NAME = BY_OP["outlook_aggregate"].plugin
#: The kernel's int32 arguments between the pointers, in its order.
SCALARS = ("C", "H", "W", "GH", "GW", "HEADS", "CH", "n_pblk", "n_cblk")


def check_attributes(kernel_size: int, padding: int, stride: int) -> None:
    if kernel_size < 1 or stride < 1 or padding < 0:
        raise ValueError(
            f"{PLUGIN_NAME}: need kernel_size, stride >= 1 and padding >= 0, got kernel_size={kernel_size}, "
            f"padding={padding}, stride={stride}"
        )


def output_shape(v, attn, kernel_size: int, padding: int, stride: int) -> tuple:
    """``v``'s shape (B, C, H, W): the windows are folded back onto the input grid."""
    check_attributes(kernel_size, padding, stride)
    return (v[0], v[1], v[2], v[3])


def window_grid(v, kernel_size: int, padding: int, stride: int) -> tuple:
    """``(h, w)``, the grid of window centres (``out_size`` with dilation 1)."""
    return (conv_out(v[2], kernel_size, stride, padding, 1), conv_out(v[3], kernel_size, stride, padding, 1))


def blocks(ch: int | None, hw: int | None) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_P)`` for ``ch`` channels per head and ``hw`` pixels; None (a dynamic size) takes
    the largest."""
    block_p = 64 if hw is None else min(max(next_pow2(hw), 16), 64)
    block_c = 32 if ch is None else min(next_pow2(ch), 32)
    return block_c, block_p


def constexprs(kernel_size: int, padding: int, stride: int, block_c: int, block_p: int) -> dict:
    """The kernel's constexpr arguments."""
    return {"K": kernel_size, "PAD": padding, "STRIDE": stride, "BLOCK_C": block_c, "BLOCK_P": block_p}


def launch_plan(v, attn, kernel_size: int, padding: int, stride: int, block_c: int, block_p: int):
    """``(grid, scalars, constexprs)`` of the kernel for shapes of ``v`` and ``attn`` (a 1-D grid)."""
    check_attributes(kernel_size, padding, stride)
    b, c, h, w = v[0], v[1], v[2], v[3]
    heads = attn[1]
    gh, gw = window_grid(v, kernel_size, padding, stride)
    ch = c // heads
    n_pblk = cdiv(h * w, block_p)
    n_cblk = cdiv(ch, block_c)
    grid = b * heads * n_pblk * n_cblk
    scalars = (c, h, w, gh, gw, heads, ch, n_pblk, n_cblk)
    return grid, scalars, constexprs(kernel_size, padding, stride, block_c, block_p)
