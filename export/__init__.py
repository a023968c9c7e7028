"""Load, adapt, export to ONNX, verify: the product's main job.

``export_onnx(model, path, input_shape, ...)`` is the Python API behind ``attn-export MODEL.pt``.
"""

from attn_export.export.checkpoint import LoadedModel, load_model, save_checkpoint
from attn_export.export.errors import ExportError
from attn_export.export.onnx_export import ExportResult, export_onnx

__all__ = ["ExportError", "ExportResult", "LoadedModel", "export_onnx", "load_model", "save_checkpoint"]
