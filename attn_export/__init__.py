"""attn-export: deploy PyTorch models built with dynamic-kernel attention blocks.

Subpackages (imported on demand, nothing heavy happens here):

- :mod:`attn_export.blocks`: reference blocks (Involution, ODConv, Outlook attention, GSoP, SKConv).
- :mod:`attn_export.plugins`: the dynamic-kernel ops with one implementation per backend.
- :mod:`attn_export.export`: load, adapt, export to ONNX, verify.
- :mod:`attn_export.serve`: runners and the HTTP service.
"""

from attn_export._version import __version__

__all__ = ["__version__"]
