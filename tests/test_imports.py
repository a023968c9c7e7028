"""Import hygiene: no heavy or optional module is imported before it is needed."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(out.split())


def test_cli_imports_nothing_heavy_up_front():
    mods = _modules_after("import attn_export.cli")
    for heavy in ("torch", "onnx", "onnxruntime", "onnxscript", "triton", "tensorrt"):
        assert heavy not in mods, f"importing the CLI imported {heavy}"


@pytest.mark.parametrize("package", ["attn_export.plugins", "attn_export.blocks", "attn_export.runtime.runners"])
def test_packages_do_not_import_optional_backends(package):
    mods = _modules_after(f"import {package}")
    for optional in ("triton", "tensorrt", "onnxruntime", "onnxscript"):
        assert optional not in mods, f"importing {package} imported {optional}"


def test_version_flag_runs_without_heavy_imports():
    res = subprocess.run([sys.executable, "-m", "attn_export", "--version"], capture_output=True, text=True)
    assert res.returncode == 0
    assert res.stdout.startswith("attn-export ")
