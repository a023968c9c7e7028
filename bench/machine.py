"""The machine, the load and the versions that every CPU benchmark prints beside its figures
(``attn-export bench`` for the blocks and ``attn-export bench MODEL.pt`` for a whole model)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def busy_warning(load: dict, threads: int) -> str:
    """A warning when other processes kept the cores busy during the run ('' when they did not).

    The load average at the end includes this run's own ``threads``; at the start, only others'."""
    cpus = os.cpu_count() or 1
    start, end = load.get("start"), load.get("end")
    others = max(start or 0.0, (end or 0.0) - threads)
    if others <= 1.0:
        return ""
    worst = max(v for v in (start, end) if v is not None)
    return (
        f"the 1-min load average reached {worst} on {cpus} CPU(s) during this run: other processes shared "
        "the cores, which slows PyTorch eager (OpenMP threads wait for each other) far more than "
        "onnxruntime, so the ratios to eager are flattering; compare the fastest samples, or rerun on an "
        "idle machine"
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} logical CPU(s), {platform.system()} {platform.machine()}"


def load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def fmt_load(load: dict) -> str:
    return f"{load['start']} at start, {load['end']} at end"


def versions() -> str:
    import onnx
    import onnxruntime
    import torch

    from attn_export import __version__

    return (
        f"attn-export {__version__} | torch {torch.__version__} | onnx {onnx.__version__} | "
        f"onnxruntime {onnxruntime.__version__} | python {platform.python_version()}"
    )
