"""The house: the import contract of pyproject.toml (``[tool.importlinter]``) holds, and no module
imports itself back through any chain, imports inside functions counted.

grimp (under import-linter) finds a package's modules by walking its folder, and this repository maps
several top-level folders into ``attn_export`` (``package-dir``), so the checks run on the layout a
non-editable install writes: a copy with the mapped folders inside ``attn_export/``. A negative control
proves each check can fail: the same copy with one import pointing up is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONFIG = tomllib.loads(PYPROJECT.read_text())
#: attn_export.<part> -> folder, as pyproject.toml maps them
MAPPED = {
    name.split(".", 1)[1]: folder
    for name, folder in CONFIG["tool"]["setuptools"]["package-dir"].items()
    if name != "attn_export"
}

# Every strongly connected set of modules (Tarjan) in grimp's graph of the copy, with the imports that
# grimp cannot see (argv[1]: JSON pairs) added: a cycle at any depth.
CYCLES = """
import json, sys, grimp
graph = grimp.build_graph("attn_export", exclude_type_checking_imports=False)
for importer, imported in json.loads(sys.argv[1] if len(sys.argv) > 1 else "[]"):
    graph.add_import(importer=importer, imported=imported)
index, low, stack, on, found, n = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in sorted(graph.find_modules_directly_imported_by(v)):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        part = []
        while True:
            w = stack.pop(); on.discard(w); part.append(w)
            if w == v: break
        if len(part) > 1: found.append(sorted(part))
for m in sorted(graph.modules):
    if m not in index: visit(m)
print(json.dumps({"modules": len(graph.modules), "cycles": found}))
"""


#: ``importlib.import_module`` calls that load no module of ours (an optional dependency by name).
NOT_OURS = {
    ("attn_export.plugins.trt", '"tensorrt.plugin"'),
}


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    folder = {v: k for k, v in MAPPED.items()}.get(parts[0])
    parts = ["attn_export", folder, *parts[1:]] if folder else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dynamic_imports() -> list[tuple[str, str]]:
    """The imports grimp cannot see: each ``importlib.import_module(<spec>.<module>)`` of the op registry
    (plugins/registry.py) is an import of that module of every op, from the module that makes the call.
    Any other ``import_module`` call fails the test until it is understood (:data:`NOT_OURS`)."""
    import re

    from attn_export.plugins.registry import OPS

    edges, unknown = [], []
    for folder in ["attn_export", *MAPPED.values()]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            importer = _module_of(path)
            for arg in re.findall(r"import_module\(([^()]*(?:\([^()]*\))?[^()]*)\)", path.read_text()):
                name = arg.rsplit(".", 1)[-1]
                if re.fullmatch(r"\w+\.\w+", arg) and hasattr(OPS[0], name):
                    edges += [(importer, getattr(spec, name)) for spec in OPS]
                elif (importer, arg) not in NOT_OURS:
                    unknown.append((importer, arg))
    assert not unknown, f"import_module calls the architecture checks cannot follow: {unknown}"
    return edges


def _install_layout(site: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "static")
    shutil.copytree(ROOT / "attn_export", site / "attn_export", ignore=ignore)
    for part, folder in MAPPED.items():
        shutil.copytree(ROOT / folder, site / "attn_export" / part, ignore=ignore)
    return site


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return _install_layout(tmp_path_factory.mktemp("site"))


def _lint(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail(f"lint-imports is not installed beside {sys.executable}: install the dev extra")
    return _run([str(lint), "--no-cache", str(PYPROJECT)], site, cwd)


def test_every_part_sits_in_a_layer():
    layers = CONFIG["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {p.strip().split(".", 1)[1] for layer in layers for p in layer.split("|")}
    assert set(MAPPED) | {"cli", "files"} == named


def test_import_contract_holds(site, tmp_path):
    done = _lint(site, tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_cycle(site, tmp_path):
    import json

    edges = dynamic_imports()
    assert ("attn_export.plugins.reference", "attn_export.plugins.outlook.numpy_ref") in edges
    done = _run([sys.executable, "-c", CYCLES, json.dumps(edges)], site, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["modules"] > 50
    assert report["cycles"] == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """Negative control: a function-level import from runtime up into serve breaks the layers, and a
    pair of files importing each other (inside functions) is a cycle."""
    import json

    site = _install_layout(tmp_path / "site")
    up = site / "attn_export" / "runtime" / "runners.py"
    up.write_text(up.read_text() + "\n\ndef _up():\n    from attn_export.serve import app  # noqa: F401\n")
    pkg = site / "attn_export" / "blocks"
    (pkg / "_a.py").write_text("def f():\n    from attn_export.blocks import _b  # noqa: F401\n")
    (pkg / "_b.py").write_text("def g():\n    from attn_export.blocks import _a  # noqa: F401\n")
    done = _lint(site, tmp_path)
    assert done.returncode != 0
    assert "attn_export.runtime.runners -> attn_export.serve.app" in done.stdout
    assert "._a -> ._b" in done.stdout or "._b -> ._a" in done.stdout
    report = json.loads(_run([sys.executable, "-c", CYCLES], site, tmp_path).stdout)
    assert ["attn_export.blocks._a", "attn_export.blocks._b"] in report["cycles"]
    # a cycle through the registry's dynamic imports is found too
    lowering = "attn_export.plugins.involution.onnx_lowering"
    back = json.dumps([*dynamic_imports(), (lowering, "attn_export.plugins")])
    report = json.loads(_run([sys.executable, "-c", CYCLES, back], site, tmp_path).stdout)
    assert any(lowering in cycle and "attn_export.plugins" in cycle for cycle in report["cycles"])
