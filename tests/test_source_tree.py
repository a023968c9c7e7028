"""The repository root imports as the package with or without an install .

pyproject.toml maps the top-level folders ``blocks/``, ``plugins/``, ``export/`` and ``serve/`` into
``attn_export`` (``package-dir``). A non-editable install holds them inside ``attn_export/``; the
root's ``attn_export/`` folder does not, and it shadows the install wherever the root is on
``sys.path`` (``python -m pytest`` there, or a subprocess started there). ``attn_export/__init__.py``
then finds them beside it, and the pytest configuration (``pythonpath = ["."]``) makes the tests
import the source tree in-process too, the same code as the subprocesses they start.

The subprocesses run with ``-S`` (no site: no editable-install finder, no ``.pth`` files), so only
the paths given here count; the dependencies come from the folder that holds torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
#: The folders pyproject.toml maps into ``attn_export`` (``package-dir``).
MAPPED = ("plugins", "blocks", "runtime", "export", "detection", "shapes", "serve", "triton_server", "bench")
DEPS = Path(torch.__file__).resolve().parents[1]
CODE = (
    "import attn_export, attn_export.plugins, attn_export.export, attn_export.serve, attn_export.blocks\n"
    "from attn_export.plugins import dynamic_conv2d\n"
    "from attn_export.export.adapt import adapt\n"
    "print(attn_export.plugins.__file__)\n"
)


def _import_from(paths: list[Path], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*paths, DEPS]))}
    done = subprocess.run(
        [sys.executable, "-S", "-c", CODE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _installed_copy(site: Path) -> None:
    """The layout a non-editable install writes: the mapped folders inside attn_export/."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "attn_export", site / "attn_export", ignore=ignore)
    for name in MAPPED:
        shutil.copytree(ROOT / name, site / "attn_export" / name, ignore=ignore)


def test_source_tree_imports_without_an_install(tmp_path):
    assert _import_from([ROOT], tmp_path) == str(ROOT / "plugins" / "__init__.py")


def test_source_tree_shadowing_a_non_editable_install_still_imports(tmp_path):
    site = tmp_path / "site"
    _installed_copy(site)
    # the root first, as `python -m pytest` (or a subprocess) started there puts it: the source tree, whole
    assert _import_from([ROOT, site], tmp_path) == str(ROOT / "plugins" / "__init__.py")
    # the install alone: its own subpackages, nothing from the root
    assert _import_from([site], tmp_path) == str(site / "attn_export" / "plugins" / "__init__.py")


def test_pytest_imports_the_source_tree():
    import attn_export.plugins

    assert Path(attn_export.plugins.__file__).resolve() == ROOT / "plugins" / "__init__.py"
