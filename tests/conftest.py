"""Test-wide set-up.

Triton decides between compiling and interpreting when a kernel is decorated, so on a machine
without CUDA the interpreter must be switched on before any kernel module is imported: that is done
here, before collection imports the test modules.
"""

from __future__ import annotations

import importlib.util
import os

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
