"""The metadata JSON beside a TensorRT engine (``model.engine`` -> ``model.engine.json``): what the
engine expects and was built with. The engine build writes it; the runner, the loader and the Triton
repository read it.

The engine has ONE optimisation profile over every dynamic axis: the batch, and for a graph exported
with ``--dynamic-hw`` the input's height and width. The metadata records it as ``"batch"`` and
``"dynamic_hw"`` (``{"min", "opt", "max"}``, or null) and as ``"profile"``: ``{"min", "opt", "max"}``
per axis name and the input's min/opt/max shapes (``"shapes"``). :func:`profile_ranges` reads the
ranges back, from older metadata (batch only) too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from attn_export.files import write_text

#: ``format`` field of the metadata JSON.
ENGINE_FORMAT = "attn-export-trt-engine/1"


def metadata_path_for(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_engine_metadata(engine_path: str | os.PathLike, metadata: Mapping) -> Path:
    """Write ``metadata`` as indented JSON beside the engine, atomically; returns the JSON's path."""
    path = metadata_path_for(engine_path)
    write_text(path, json.dumps(metadata, indent=2) + "\n")
    return path


#: The axis names of the optimisation profile, in the input's order (batch, then height and width).
PROFILE_AXES = ("batch", "height", "width")


def profile_ranges(metadata: Mapping) -> dict[str, tuple[int, int, int]]:
    """``{axis: (min, opt, max)}`` of the engine's dynamic axes: ``batch`` always, ``height`` and ``width``
    where the engine was built with dynamic sides. Metadata written before ``profile`` existed gives the
    batch alone."""
    profile = metadata.get("profile") or {}
    ranges = {}
    for axis in PROFILE_AXES:
        entry = profile.get(axis) or (metadata.get("batch") if axis == "batch" else None)
        if entry:
            ranges[axis] = (int(entry["min"]), int(entry["opt"]), int(entry["max"]))
    return ranges


def read_engine_metadata(engine_path: str | os.PathLike) -> dict | None:
    """The metadata JSON beside an engine, or None where there is none."""
    path = metadata_path_for(engine_path)
    if not path.exists():
        return None
    return json.loads(path.read_text())
