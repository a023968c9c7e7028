"""Shape arithmetic of the launch plans and the TensorRT plugins, on ints and on shape expressions.

The plugins' shape logic is written against the operators ``tensorrt.plugin.ShapeExpr`` supports:
indexing of the input's ``shape_expr``, and ``expr + int``, ``expr - int``, ``expr * int``,
``expr // int`` and the same with an expression on the right. There are no reflected operators
(``2 * expr`` fails) and no truth value, so every helper keeps the expression on the left and never
branches on it. Plain ints satisfy the same protocol, which is how the JIT path and the tests use it.
"""

from __future__ import annotations


def add(expr, constant: int):
    """``expr + constant`` without a negative constant (written as a subtraction instead)."""
    return expr + constant if constant >= 0 else expr - (-constant)


def cdiv(expr, divisor: int):
    """``ceil(expr / divisor)`` for a positive int ``divisor``, using only ``+`` and ``//``."""
    return (expr + (divisor - 1)) // divisor


def conv_out(size, kernel, stride: int, padding: int, dilation: int):
    """``(size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1`` (the ops' ``out_size``).

    ``size`` may be a shape expression; ``kernel`` an int or (for ``dynamic_conv2d``, whose kernel size
    is the weight's shape) a shape expression too.
    """
    if isinstance(kernel, int):
        return add(size, 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return (add(size, 2 * padding + dilation - 1) - kernel * dilation) // stride + 1


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), as ``triton.next_power_of_2``."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def static_dims(shape) -> tuple[int | None, ...]:
    """Concrete dims of a TensorRT shape, with None for the dynamic ones (-1)."""
    return tuple(int(d) if int(d) >= 0 else None for d in shape)
