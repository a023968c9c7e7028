"""Small onnxscript helpers shared by the ops' ONNX lowerings.

The lowerings are traced by the torch.onnx (dynamo) exporter: they receive symbolic values and plain
Python attributes, so Python loops over taps unroll into the graph. A value's ``shape`` holds ints for
its static dimensions and ``onnx_ir.SymbolicDim`` for the dynamic ones (the batch, and the height and
width of a ``--dynamic-hw`` export). :func:`spatial` turns dynamic heights and widths into :class:`Dim` values,
which compute their arithmetic in the graph (``Shape`` and scalar int64 ops) while static sizes stay
Python ints, so a static export is the same graph as before and a dynamic one bakes no size into a
constant. :func:`vec` builds the 1-D int64 inputs (``Pad`` pads, ``Slice`` starts, ``Reshape`` shapes)
from a mix of both.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript import opset18 as op


def ints(values: Sequence[int]):
    """An int64 1-D constant."""
    return op.Constant(value_ints=[int(v) for v in values])


class Dim:
    """A size known only when the graph runs: a 1-element int64 value, with ``+ - * //`` (with ints or
    other ``Dim`` on either side) emitting the ONNX ops. ``//`` is floor division (exact for negative
    numerators too: ``(a - a mod b) / b`` with ONNX's integer ``Mod``, which takes the divisor's sign, as
    Python's). No truth value and no comparison: a lowering decides a branch only on static sizes
    (:func:`same`) and otherwise takes the general path."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __add__(self, other):
        return add(self, other)

    __radd__ = __add__

    def __sub__(self, other):
        return sub(self, other)

    def __rsub__(self, other):
        return sub(other, self)

    def __neg__(self):
        return Dim(op.Neg(self.value))

    def __mul__(self, other):
        return mul(self, other)

    __rmul__ = __mul__

    def __floordiv__(self, other):
        return floordiv(self, other)

    def __rfloordiv__(self, other):
        return floordiv(other, self)

    def __bool__(self):
        raise TypeError("a Dim is a size computed in the graph; it has no truth value while tracing")

    def __eq__(self, other):  # never an implicit identity test on sizes
        raise TypeError("a Dim cannot be compared while tracing; use same() for static sizes")

    __hash__ = None  # type: ignore[assignment]


Size = int | Dim


def _value(size: Size):
    return size.value if isinstance(size, Dim) else ints([size])


def add(a: Size, b: Size) -> Size:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(b, int) and b == 0:
        return a
    if isinstance(a, int) and a == 0:
        return b
    return Dim(op.Add(_value(a), _value(b)))


def sub(a: Size, b: Size) -> Size:
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    if isinstance(b, int):
        return add(a, -b)
    return Dim(op.Sub(_value(a), _value(b)))


def mul(a: Size, b: Size) -> Size:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if (isinstance(a, int) and a == 0) or (isinstance(b, int) and b == 0):
        return 0
    if isinstance(b, int) and b == 1:
        return a
    if isinstance(a, int) and a == 1:
        return b
    return Dim(op.Mul(_value(a), _value(b)))


def floordiv(a: Size, b: Size) -> Size:
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    if isinstance(b, int) and b == 1:
        return a
    va, vb = _value(a), _value(b)
    return Dim(op.Div(op.Sub(va, op.Mod(va, vb)), vb))


def maximum(a: Size, b: Size) -> Size:
    """``max(a, b)``, in the graph where either is dynamic."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return Dim(op.Max(_value(a), _value(b)))


def minimum(a: Size, b: Size) -> Size:
    """``min(a, b)``, in the graph where either is dynamic."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return Dim(op.Min(_value(a), _value(b)))


def cdiv(a: Size, b: int) -> Size:
    """``ceil(a / b)`` for a positive int ``b``."""
    return (a + (b - 1)) // b


def same(a: Size, b: Size) -> bool:
    """True when both sizes are static and equal (a dynamic size is never known to equal anything)."""
    return isinstance(a, int) and isinstance(b, int) and a == b


def is_static(*sizes: Size) -> bool:
    return all(isinstance(s, int) for s in sizes)


def spatial(x) -> tuple[Size, Size]:
    """The height and width (last two axes) of ``x``: ints where static, :class:`Dim` (a ``Shape`` slice)
    where symbolic. Only these get a ``Shape`` node: a static export computes nothing at run time."""
    rank = len(x.shape)
    out: list[Size] = []
    for axis in (rank - 2, rank - 1):
        d = x.shape[axis]
        out.append(d if isinstance(d, int) else Dim(op.Shape(x, start=axis, end=axis + 1)))
    return out[0], out[1]


def static_dim(x, axis: int, what: str) -> int:
    """``x.shape[axis]``, which the lowering needs as an int (a channel or group count); a clear error
    otherwise."""
    d = x.shape[axis]
    if not isinstance(d, int):
        raise ValueError(f"{what} (axis {axis} of a {len(x.shape)}-D input) must be static for this lowering, got {d}")
    return d


def vec(values: Sequence[Size]):
    """A 1-D int64 value of ``values``: one constant when all are static, else a Concat of the runs of
    static values (constants) and the dynamic ones."""
    if all(isinstance(v, int) for v in values):
        return ints(values)
    parts, run = [], []
    for v in values:
        if isinstance(v, int):
            run.append(v)
            continue
        if run:
            parts.append(ints(run))
            run = []
        parts.append(v.value)
    if run:
        parts.append(ints(run))
    return op.Concat(*parts, axis=0)


def pad_hw(x, ph: int, pw: int):
    """Zero-pad the last two axes of a 4-D value."""
    if ph == 0 and pw == 0:
        return x
    return op.Pad(x, ints([0, 0, ph, pw, 0, 0, ph, pw]))


def tap(xp, axes: tuple[int, int], r0: int, c0: int, counts: tuple[Size, Size], steps: tuple[int, int]):
    """The strided window of padded ``xp`` that a tap starting at ``(r0, c0)`` reads."""
    ends = [r0 + steps[0] * (counts[0] - 1) + 1, c0 + steps[1] * (counts[1] - 1) + 1]
    return op.Slice(xp, ints([r0, c0]), vec(ends), ints(list(axes)), ints(list(steps)))
