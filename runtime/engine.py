"""The metadata JSON beside a TensorRT engine (``model.engine`` -> ``model.engine.json``): what the
engine expects and was built with. The engine build writes it; the runner, the loader and the Triton
repository read it.
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


def read_engine_metadata(engine_path: str | os.PathLike) -> dict | None:
    """The metadata JSON beside an engine, or None where there is none."""
    path = metadata_path_for(engine_path)
    if not path.exists():
        return None
    return json.loads(path.read_text())
