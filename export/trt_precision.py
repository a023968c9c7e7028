"""The engine build's half-precision step: which nodes stay fp32 (:mod:`attn_export.export.precision_graph`,
with fp16 activation ranges measured on sample inputs), the converted graph a strongly typed TensorRT
parses, and the precision a graph already has."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attn_export.export import precision_graph as pg
from attn_export.export.errors import ExportError


def low_graph_path_for(engine_path: str | os.PathLike, low: str) -> Path:
    """``model.engine`` -> ``model.fp16.onnx`` (the strongly typed graph a TensorRT 11 fp16 build parses)."""
    engine_path = Path(engine_path)
    return engine_path.with_name(f"{engine_path.stem}.{low}.onnx")


def precision_plan(onnx_path: Path, low: str, input_name: str, input_shape, samples, say: Callable[[str, str], None]):
    """``(plan, fp32 model)`` of the precision step for ``onnx_path``; fp16 measures activation ranges."""
    import onnx

    model = onnx.load(str(onnx_path))
    ranges = {}
    if low == "fp16":
        if samples is None:
            samples = [np.random.default_rng(0).standard_normal((1, *input_shape), dtype=np.float32)]
        try:
            ranges = pg.measure_ranges(model, samples, input_name)
        except Exception as e:  # the structural rules still apply; say what was not measured
            say("precision", f"activation ranges not measured ({type(e).__name__}: {e}); structural rules only")
    plan = pg.plan_precision(model, low, ranges)
    kinds = ", ".join(f"{k} {v}" for k, v in plan.reasons().items()) or "none"
    say("precision", f"{low}: {len(plan.fp32)} node(s) kept fp32 ({kinds})")
    return plan, model


def convert_graph(model, plan):
    """``model`` converted to the plan's low precision; a graph the step cannot convert raises :class:`ExportError`."""
    try:
        return pg.convert(model, plan)
    except ValueError as e:
        raise ExportError(f"precision step: {e}") from e


def graph_precision(onnx_path: Path) -> str:
    """``fp32``, ``fp16`` or ``bf16``: the precision the ONNX file's types already say."""
    import onnx

    return pg.graph_precision(onnx.load(str(onnx_path), load_external_data=False))
