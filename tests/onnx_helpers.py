"""What the lowering tests share: a quiet ``torch.onnx`` (dynamo) export and a one-thread onnxruntime session.

``tests/`` is on ``sys.path`` (see tests/weights.py), so test modules ``from onnx_helpers import ...``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnxruntime as ort
import torch
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ReferenceConvTranspose
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


class ConvTranspose(_ReferenceConvTranspose):
    """``onnx.reference``'s ConvTranspose (named as the op it replaces), one group at a time: its own
    ``group > 1`` branch slices the weight by output instead of input channels (onnx 1.x), so this runs
    each group with ``group=1``."""

    def _run(self, X, W, B=None, group=None, **kwargs):
        if not group or group == 1:
            return super()._run(X, W, B, group=1, **kwargs)
        cin, cout = X.shape[1] // group, W.shape[1]
        parts = [
            super(ConvTranspose, self)._run(
                X[:, g * cin : (g + 1) * cin],
                W[g * cin : (g + 1) * cin],
                None if B is None else B[g * cout : (g + 1) * cout],
                group=1,
                **kwargs,
            )[0]
            for g in range(group)
        ]
        return (np.concatenate(parts, axis=1),)
