"""The dynamic batch range and the input shape, shared by the ONNX export and the engine build."""

from __future__ import annotations

from collections.abc import Sequence

from attn_export.export.errors import ExportError


def parse_batch(batch: str | Sequence[int]) -> tuple[int, int, int]:
    """``(min, opt, max)`` with ``1 <= min <= opt <= max``, from ``"1:4:32"`` (``"8"`` means ``1:8:8``)
    or a sequence of three sizes."""
    if isinstance(batch, str):
        try:
            vals = [int(p) for p in batch.split(":")]
        except ValueError:
            vals = []
        if len(vals) == 1:
            vals = [1, vals[0], vals[0]]
    else:
        vals = [int(b) for b in batch]
    if len(vals) != 3 or not (1 <= vals[0] <= vals[1] <= vals[2]):
        shown = repr(batch) if isinstance(batch, str) else str(tuple(batch))
        raise ExportError(f"--batch: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {shown}")
    return vals[0], vals[1], vals[2]


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """The input's shape without the batch, as positive ints."""
    dims = tuple(int(d) for d in input_shape)
    if not dims or min(dims) < 1:
        raise ExportError(f"input shape: expected positive dims without the batch (e.g. 3,224,224), got {input_shape}")
    return dims


def profile_shapes(
    input_shape: Sequence[int], batch: Sequence[int], dynamic_hw: Sequence[int] | str | None = None
) -> tuple[tuple[int, ...], ...]:
    """The optimisation profile's (min, opt, max) input shapes, one profile over every dynamic axis: each
    batch size prepended to the shape; with ``dynamic_hw`` (side lengths ``(min, opt, max)`` or
    ``"MIN:OPT:MAX"``) the height and width of a (C, H, W) shape range over them too, both sides alike."""
    dims = check_input_shape(input_shape)
    if dynamic_hw is None:
        return tuple((b, *dims) for b in parse_batch(batch))
    if len(dims) != 3:
        raise ExportError(f"dynamic height and width need a (C, H, W) input shape, got {list(dims)}")
    return tuple((b, dims[0], side, side) for b, side in zip(parse_batch(batch), parse_hw(dynamic_hw), strict=True))


def parse_hw(hw: str | Sequence[int]) -> tuple[int, int, int]:
    """``(min, opt, max)`` image side lengths for ``--dynamic-hw``, from ``"160:320:640"`` or three sizes,
    with ``2 <= min <= opt <= max`` and ``min < max`` (torch fixes sizes 0 and 1 while tracing)."""
    if isinstance(hw, str):
        try:
            vals = [int(p) for p in hw.split(":")]
        except ValueError:
            vals = []
    else:
        vals = [int(v) for v in hw]
    if len(vals) != 3 or not (2 <= vals[0] <= vals[1] <= vals[2]) or vals[0] == vals[2]:
        shown = repr(hw) if isinstance(hw, str) else str(tuple(hw))
        raise ExportError(
            f"--dynamic-hw: expected MIN:OPT:MAX side lengths with 2 <= MIN <= OPT <= MAX and MIN < MAX, got {shown}"
        )
    return vals[0], vals[1], vals[2]


def rounded_hw(hw: Sequence[int], multiple: int = 1) -> tuple[int, int, int]:
    """``(min, opt, max)`` in multiples of ``multiple``: MIN rounded up, MAX down, OPT to the nearest."""
    lo, opt, hi = parse_hw(hw)
    if multiple > 1:
        lo, hi = -(-lo // multiple) * multiple, hi // multiple * multiple
        if lo >= hi:
            raise ExportError(f"--dynamic-hw: {hw[0]}..{hw[2]} holds fewer than two multiples of {multiple}")
        opt = min(max(round(opt / multiple) * multiple, lo), hi)
    return lo, opt, hi


def verify_sizes(hw: Sequence[int], multiple: int = 1) -> list[tuple[int, int]]:
    """The (height, width) sizes a graph with dynamic height and width is verified at: MIN, OPT, MAX, an
    odd size (both sides odd) and a non-square one, all within ``min..max``.

    With ``multiple`` > 1 (a model whose sides must be multiples of its stride) every side is one
    (:func:`rounded_hw`), and an odd multiple of ``multiple`` stands in for the odd size."""
    lo, opt, hi = rounded_hw(hw, multiple)
    sizes = [(lo, lo), (opt, opt), (hi, hi)]
    candidates = [opt + multiple, opt - multiple, lo + multiple, hi - multiple, opt + 3 * multiple]
    # an odd multiple of ``multiple`` (an odd size when it is 1): a model that needs twice the multiple
    # fails there
    odd = next((v for v in candidates if lo <= v <= hi and (v // multiple) % 2), None)
    if odd is not None and not any((s[0] // multiple) % 2 for s in sizes):
        sizes.append((odd, odd))
    sizes.append((lo, opt) if lo != opt else (opt, hi))
    return list(dict.fromkeys(sizes))
