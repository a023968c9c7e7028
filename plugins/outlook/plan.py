"""Launch plans of the outlook kernels (``cuda_kernel._outlook_rows`` for k <= 3, else
``cuda_kernel._outlook_aggregate_fwd``), shared by the op's CUDA launcher and the TensorRT plugin's AOT
implementation.

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


# ------------------------------------------------------------------------------ window rows (k <= 3)
#: The window-row kernel's int32 arguments between the pointers, in its order.
ROWS_SCALARS = ("C", "H", "W", "GH", "GW", "HEADS", "CH", "n_tile", "n_xblk", "n_cblk")
#: Largest kernel size the window-row kernel takes (its attention tile holds a window's k^4 weights);
#: larger kernels run ``_outlook_aggregate_fwd``.
ROWS_MAX_K = 3
#: Warps per program of the window-row kernel: with 4, the gathers' indices and tiles need more than 255
#: registers per thread (ptxas spills at k=3); with 8 none spill (``attn-export kernels``).
ROWS_NUM_WARPS = 8
#: Widest v tile (columns) of the window-row kernel; wider images are cut into column blocks.
ROWS_MAX_WIDTH = 32


def uses_rows(kernel_size: int) -> bool:
    """Whether ``outlook_aggregate`` runs the window-row kernel (``kernel_size <= ROWS_MAX_K``)."""
    return kernel_size <= ROWS_MAX_K


def rows_blocks(ch: int | None, w: int | None, kernel_size: int, stride: int) -> tuple[int, int, int, int]:
    """``(BLOCK_C, BLOCK_V, BLOCK_J, ROWS)`` of the window-row kernel for ``ch`` channels per head and
    width ``w`` (None, a dynamic size: the widest tile). A tile of ``BLOCK_V`` v columns serves
    ``BLOCK_V - 2(k-1)`` output columns and at most ``BLOCK_J`` windows per row; ``ROWS`` output rows
    keep the accumulator at 8192 values."""
    r = kernel_size - 1
    block_c = 32 if ch is None else min(next_pow2(ch), 32)
    need = ROWS_MAX_WIDTH if w is None else w + 2 * r
    block_v = max(min(next_pow2(need), ROWS_MAX_WIDTH), 16)
    tw = block_v - 2 * r
    block_j = next_pow2((tw + r - 1) // stride + 1)
    rows = max(8192 // (block_v * block_c), 1)
    return block_c, block_v, block_j, min(rows, 8)


def rows_constexprs(kernel_size: int, padding: int, stride: int, block_c: int, block_v: int, block_j: int,
                    rows: int) -> dict:  # fmt: skip
    """The window-row kernel's constexpr arguments."""
    return {"K": kernel_size, "PAD": padding, "STRIDE": stride, "BLOCK_C": block_c, "BLOCK_V": block_v,
            "BLOCK_J": block_j, "ROWS": rows, "KK2P": next_pow2(kernel_size**4)}  # fmt: skip


def rows_launch_plan(v, attn, kernel_size: int, padding: int, stride: int, block_c: int, block_v: int,
                     block_j: int, rows: int):  # fmt: skip
    """``(grid, scalars, constexprs)`` of the window-row kernel for shapes of ``v`` and ``attn`` (a 1-D grid
    of ``B * heads * n_cblk * cdiv(H, ROWS) * cdiv(W, BLOCK_V - 2(k-1))`` programs)."""
    check_attributes(kernel_size, padding, stride)
    b, c, h, w = v[0], v[1], v[2], v[3]
    heads = attn[1]
    gh, gw = window_grid(v, kernel_size, padding, stride)
    ch = c // heads
    n_xblk = cdiv(w, block_v - 2 * (kernel_size - 1))
    n_tile = cdiv(h, rows) * n_xblk
    n_cblk = cdiv(ch, block_c)
    grid = b * heads * n_tile * n_cblk
    scalars = (c, h, w, gh, gw, heads, ch, n_tile, n_xblk, n_cblk)
    return grid, scalars, rows_constexprs(kernel_size, padding, stride, block_c, block_v, block_j, rows)
