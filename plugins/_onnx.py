"""Small onnxscript helpers shared by the ops' ONNX lowerings.

The lowerings are traced by the torch.onnx (dynamo) exporter: they receive symbolic values whose
``shape`` holds the static dimensions (the batch stays symbolic) and plain Python attributes, so
Python loops over taps unroll into the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript import opset18 as op


def ints(values: Sequence[int]):
    """An int64 1-D constant."""
    return op.Constant(value_ints=[int(v) for v in values])


def pad_hw(x, ph: int, pw: int):
    """Zero-pad the last two axes of a 4-D value."""
    if ph == 0 and pw == 0:
        return x
    return op.Pad(x, ints([0, 0, ph, pw, 0, 0, ph, pw]))


def strided(x, axis: int, start: int, count: int, step: int):
    """``x[..., start : start + step * (count - 1) + 1 : step, ...]`` along ``axis``."""
    return op.Slice(x, ints([start]), ints([start + step * (count - 1) + 1]), ints([axis]), ints([step]))


def tap(xp, axes: tuple[int, int], r0: int, c0: int, counts: tuple[int, int], steps: tuple[int, int]):
    """The strided window of padded ``xp`` that a tap starting at ``(r0, c0)`` reads."""
    ends = [r0 + steps[0] * (counts[0] - 1) + 1, c0 + steps[1] * (counts[1] - 1) + 1]
    return op.Slice(xp, ints([r0, c0]), ints(ends), ints(list(axes)), ints(list(steps)))
