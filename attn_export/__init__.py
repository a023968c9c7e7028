"""attn-export: deploy PyTorch models built with dynamic-kernel attention blocks.

Subpackages (imported on demand, nothing heavy happens here):

- :mod:`attn_export.blocks`: reference blocks (Involution, ODConv, Outlook attention, GSoP, SKConv).
- :mod:`attn_export.plugins`: the dynamic-kernel ops with one implementation per backend.
- :mod:`attn_export.export`: load, adapt, export to ONNX, verify.
- :mod:`attn_export.serve`: runners and the HTTP service.
"""

import os as _os

from attn_export._version import __version__

__all__ = ["__version__"]

# A source checkout: pyproject.toml maps the top-level folders blocks/, plugins/, export/ and serve/
# into this package (``package-dir``), so an installed copy holds them inside, and this folder does not.
# When this folder is the one imported (the repository root on sys.path, e.g. ``python -m pytest`` there,
# shadowing a non-editable install), look for them beside it, as the mapping does. Two stat calls.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "plugins")) and _os.path.isfile(
    _os.path.join(_root, "plugins", "__init__.py")
):
    __path__.append(_root)
del _root
