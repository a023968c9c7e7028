"""The plugin nodes of the ``trt`` target for ``onnx.reference``: numpy implementations of the ops.

``ReferenceEvaluator(model, new_ops=reference_ops())`` runs a ``--target trt`` graph on any machine
(no GPU, no TensorRT): every standard node by ONNX's reference implementation, every plugin node by
the numpy code in ``plugins/<op>/numpy_ref.py``. It is slow, which is fine for verification.
"""

from __future__ import annotations

from attn_export.plugins._trt_names import DOMAIN, PLUGINS


def reference_ops() -> list:
    """The ``OpRun`` classes of the three plugin nodes (class name = plugin name, domain ``DOMAIN``)."""
    from attn_export.plugins.dynamic_conv.numpy_ref import AttnExportDynamicConv2d
    from attn_export.plugins.involution.numpy_ref import AttnExportInvolution2d
    from attn_export.plugins.outlook.numpy_ref import AttnExportOutlookAggregate

    ops = [AttnExportInvolution2d, AttnExportDynamicConv2d, AttnExportOutlookAggregate]
    names = [cls.__name__ for cls in ops]
    if sorted(names) != sorted(PLUGINS.values()) or any(cls.op_domain != DOMAIN for cls in ops):
        raise RuntimeError(f"reference ops {names} do not match the plugin names {sorted(PLUGINS.values())}")
    return ops
