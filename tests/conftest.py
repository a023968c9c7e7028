"""Test-wide set-up.

Triton decides between compiling and interpreting when a kernel is decorated, so on a machine
without CUDA the interpreter must be switched on before any kernel module is imported: that is done
here, before collection imports the test modules.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    no_trt = pytest.mark.skip(
        reason="needs TensorRT and a CUDA GPU; TensorRT is not installed here (its PyPI wheels are stubs)"
    )
    for item in items:
        # get_closest_marker, not `in item.keywords`: keywords also hold the folder names (a checkout in a
        # folder named "trt" would skip every test).
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("trt") and not (_has_tensorrt() and torch.cuda.is_available()):
            item.add_marker(no_trt)


@pytest.fixture(scope="session")
def standin_onnx(tmp_path_factory) -> Path:
    """The stand-in exported with attn-export (dynamic batch) and stamped with the class names."""
    from serve_helpers import CLASSES, SIZE, StandInDetector

    from attn_export.detection.loader import _stamp
    from attn_export.export import export_onnx

    path = tmp_path_factory.mktemp("model") / "standin.onnx"
    result = export_onnx(StandInDetector(), path, (3, SIZE, SIZE), batch=(1, 1, 8), seed=0)
    assert result.ok
    _stamp(path, {"classes": CLASSES})
    return path


@pytest.fixture(scope="session")
def standin_checkpoint(tmp_path_factory) -> Path:
    """The stand-in as an attn-export checkpoint (its architecture registered for the test session)."""
    from serve_helpers import CLASSES, SIZE, StandInDetector

    from attn_export.export import save_checkpoint
    from attn_export.export.checkpoint import architectures

    architectures()["StandInDetector"] = StandInDetector
    path = tmp_path_factory.mktemp("ckpt") / "standin.pt"
    save_checkpoint(path, StandInDetector(), "StandInDetector", {}, (3, SIZE, SIZE), meta={"classes": CLASSES})
    return path
