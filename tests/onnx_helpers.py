"""What the lowering tests share: a quiet ``torch.onnx`` (dynamo) export and a one-thread onnxruntime session.

``tests/`` is on ``sys.path`` (see tests/weights.py), so test modules ``from onnx_helpers import ...``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnxruntime as ort
import torch
from torch import nn


def quiet_export(module: nn.Module, args: tuple, dynamic_shapes: tuple, table: dict, optimize: bool):
    """``torch.onnx.export(module, args, dynamo=True)`` at opset 18 with ``table``, its registration notes,
    warnings and prints silenced; the ``ModelProto``."""
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=table,
                opset_version=18,
                optimize=optimize,
            )
    finally:
        quiet.setLevel(level)
    return prog.model_proto


def session(model) -> ort.InferenceSession:
    """An onnxruntime CPU session of ``model`` (a ModelProto) on one thread, warnings off."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
