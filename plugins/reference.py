"""The plugin nodes of the ``trt`` target for ``onnx.reference``: numpy implementations of the ops.

``ReferenceEvaluator(model, new_ops=reference_ops())`` runs a ``--target trt`` graph on any machine
(no GPU, no TensorRT): every standard node by ONNX's reference implementation, every plugin node by
the numpy code in ``plugins/<op>/numpy_ref.py``. It is slow, which is fine for verification.
"""

from __future__ import annotations

import importlib

from attn_export.plugins._trt_names import DOMAIN
from attn_export.plugins.registry import OPS


def reference_ops() -> list:
    """The ``OpRun`` classes of the plugin nodes (class name = plugin name, domain ``DOMAIN``)."""
    ops = [getattr(importlib.import_module(spec.numpy_ref), spec.plugin) for spec in OPS]
    if any(cls.__name__ != spec.plugin or cls.op_domain != DOMAIN for cls, spec in zip(ops, OPS, strict=True)):
        names = [cls.__name__ for cls in ops]
        raise RuntimeError(f"reference ops {names} do not match the plugin names {[s.plugin for s in OPS]}")
    return ops
