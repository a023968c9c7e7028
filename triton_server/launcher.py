"""Run the real Triton Inference Server on a model repository (``attn-export triton serve DIR``).

The ``tritonserver`` binary is the one on ``PATH`` (NVIDIA's images, a local build), else the one inside
the ``nvidia-pytriton`` wheel (Triton 2.51 with its Python backend; ``pip install
'attn-export[triton-server]'``). For the wheel's binary, :func:`find_tritonserver` puts the wheel's
``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH`` and assembles a backend folder holding the Python
backend and the stub for this interpreter's Python version (the stub links the system's
``libpython3.X.so``).

The models of an attn-export repository import ``attn_export`` inside the stub, whose embedded Python
ignores ``PYTHONPATH``: the server gets this interpreter's site-packages folders in
``ATTN_EXPORT_SITE_DIRS``, which the repository's ``model.py`` adds as site folders (``.pth`` files
there, such as an editable install's, then take effect). The wheel's stub is built against numpy 1.x;
where this environment has numpy 2, a folder holding numpy < 2 goes first (``<sys.prefix>/triton-stub``
or ``ATTN_EXPORT_TRITON_STUB_SITE``; :func:`stub_site_command` prints the command that makes it).

A repository written by an attn-export whose Python-backend models imported ``attn_export.serve.triton_model``
(the module is now :mod:`attn_export.triton_server.model`) is refused before the server starts
(:class:`OutdatedRepository`; the message gives the ``sed`` command that rewrites it).

Every port listens on 127.0.0.1 unless ``--address`` says otherwise. :class:`TritonServer` starts the
server in its own process group and always ends that whole group (the stubs too) on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

INSTALL = "pip install 'attn-export[triton-server]'"
INSTALL_HINT = (
    f"install it with:  {INSTALL}  (the nvidia-pytriton wheel bundles tritonserver 2.51 for Linux x86-64 "
    "glibc >= 2.35; it pins numpy < 2, so in an environment with numpy 2 use 'pip install --no-deps "
    "nvidia-pytriton'), or run NVIDIA's image nvcr.io/nvidia/tritonserver:<yy.mm>-py3 (docker/compose.yaml, "
    "profile triton)"
)
ARGS_FILE = "tritonserver.args"
MODEL_MODULE = "attn_export.triton_server.model"  # what a repository's model.py imports
OLD_MODEL_MODULE = "attn_export.serve.triton_model"  # what it imported in repositories of older releases


class TritonNotFound(RuntimeError):
    """No tritonserver binary here; the message says how to install one."""


class TritonFailed(RuntimeError):
    """tritonserver exited or did not get ready; the message holds the end of its log."""


class OutdatedRepository(RuntimeError):
    """The repository's models import a module that no longer exists; the message says how to rewrite them."""


@dataclass
class Installation:
    """A runnable tritonserver: the binary, and what its environment and command line need."""

    binary: Path
    source: str  # "PATH" or "nvidia-pytriton"
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    cleanup: list[Path] = field(default_factory=list)
    cwd: Path | None = None  # the working directory to start it in


def site_dirs() -> list[str]:
    """This interpreter's site-packages folders, in import order (the venv's first)."""
    seen, out = set(), []
    for p in sys.path:
        if p and p.rstrip("/").endswith(("site-packages", "dist-packages")) and os.path.isdir(p) and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def stub_site() -> Path | None:
    """The folder holding numpy < 2 for the wheel's Python-backend stub: ``ATTN_EXPORT_TRITON_STUB_SITE``, else
    ``<sys.prefix>/triton-stub`` when it exists."""
    given = os.environ.get("ATTN_EXPORT_TRITON_STUB_SITE")
    if given:
        return Path(given)
    default = Path(sys.prefix) / "triton-stub"
    return default if default.is_dir() else None


def stub_site_command() -> str:
    target = shlex.quote(str(Path(sys.prefix) / "triton-stub"))
    return f"{shlex.quote(sys.executable)} -m pip install --target {target} 'numpy<2'"


def _numpy_major() -> int | None:
    from importlib import metadata

    try:
        return int(metadata.version("numpy").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def python_env(extra_site: Path | None = None) -> dict[str, str]:
    """What the Python-backend stub needs to import attn_export and its dependencies from this interpreter.

    The stub's embedded Python ignores ``PYTHONPATH``: the repository's ``model.py`` adds the folders in
    ``ATTN_EXPORT_SITE_DIRS`` as site folders, in order (``extra_site``, the numpy < 2 folder, first).
    """
    dirs = ([str(extra_site)] if extra_site else []) + site_dirs()
    return {"ATTN_EXPORT_SITE_DIRS": os.pathsep.join(dirs), "PYTHONNOUSERSITE": "1"}


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # finds without importing (pytriton's own imports are heavy)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attn-export"


def backend_folder(dist: Path, stub: Path, work_dir: Path | None = None) -> tuple[Path, list[Path]]:
    """A backend folder for the wheel's tritonserver: its Python backend with this Python's stub beside it
    (where the backend looks for it). Kept in the user's cache (built once, renamed into place), else in a
    temporary folder that is removed with the server; returns ``(folder, folders to remove)``."""

    def build(into: Path) -> None:
        python = into / "python"
        python.mkdir(parents=True)
        for item in (dist / "backends" / "python").iterdir():
            if item.is_file():
                shutil.copy2(item, python / item.name)
        shutil.copy2(stub, python / "triton_python_backend_stub")

    if work_dir is None:
        stamp = f"{dist.stat().st_mtime_ns}-{stub.stat().st_size}"
        cached = _cache_root() / f"tritonserver-backends-py{stub.parent.name}-{stamp}"
        if (cached / "python" / "triton_python_backend_stub").is_file():
            return cached, []
        with contextlib.suppress(OSError):
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cached.parent))
            try:
                build(tmp / "b")
                os.replace(tmp / "b", cached)
            except OSError:
                if not (cached / "python" / "triton_python_backend_stub").is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return cached, []
    work = Path(tempfile.mkdtemp(prefix="attn-export-triton-", dir=work_dir))
    build(work / "backends")
    return work / "backends", [work]


def find_tritonserver(work_dir: Path | None = None) -> Installation:
    """The tritonserver to run: on PATH, else from the nvidia-pytriton wheel; :class:`TritonNotFound` if neither."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Installation(Path(on_path), "PATH", env=python_env(stub_site()))
    root = _pytriton_root()
    dist = root / "tritonserver" if root else None
    if dist is None or not (dist / "bin" / "tritonserver").is_file():
        raise TritonNotFound(f"no tritonserver on PATH and no nvidia-pytriton wheel in this Python; {INSTALL_HINT}")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFound(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    libs = root.parent / "nvidia_pytriton.libs"
    backends, cleanup = backend_folder(dist, stub, work_dir)
    # The wheel's stub is built against numpy 1.x (numpy 2 changed the array descriptor's layout: BYTES
    # tensors arrive as garbage); with numpy 2 here, the stub takes numpy < 2 from a folder of its own.
    extra = stub_site()
    if (_numpy_major() or 1) >= 2 and extra is None:
        raise TritonNotFound(
            "the nvidia-pytriton stub needs numpy < 2 and this environment has numpy 2; give it a folder of its "
            f"own with:  {stub_site_command()}  (or set ATTN_EXPORT_TRITON_STUB_SITE to such a folder)"
        )
    ld = os.pathsep.join([str(libs), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    return Installation(
        dist / "bin" / "tritonserver",
        "nvidia-pytriton",
        env={"LD_LIBRARY_PATH": ld, **python_env(extra)},
        args=[f"--backend-directory={backends}"],
        cleanup=cleanup,
        # The stub's embedded Python finds this environment (through PATH) and imports numpy, in
        # triton_python_backend_utils, before model.py can put the numpy < 2 folder first; its sys.path
        # starts with '' (the working directory), so the server starts in that folder. Every path on its
        # command line is absolute.
        cwd=extra,
    )


def repository_args(repo: Path) -> list[str]:
    """Flags a repository asks for in its ``tritonserver.args`` (plugin paths made absolute)."""
    path = repo / ARGS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--backend-config=tensorrt,plugins="):
            head, libs = line.split("plugins=", 1)
            libs = ";".join(str((repo / p).resolve()) for p in libs.split(";") if p)
            line = f"{head}plugins={libs}"
        out.extend(shlex.split(line))
    return out


def check_repository(repo: Path) -> None:
    """:class:`OutdatedRepository` if a model's ``model.py`` imports :data:`OLD_MODEL_MODULE`."""
    old = sorted(
        path.parent.parent.name
        for path in repo.glob("*/1/model.py")
        if OLD_MODEL_MODULE in path.read_text(encoding="utf-8", errors="replace")
    )
    if old:
        where = shlex.quote(str(repo))
        raise OutdatedRepository(
            f"{repo}: the model.py of {', '.join(old)} imports {OLD_MODEL_MODULE}, which is now {MODEL_MODULE}; "
            f"rewrite it with:  sed -i 's/{OLD_MODEL_MODULE}/{MODEL_MODULE}/' {where}/*/1/model.py  "
            f"(or write the repository again: attn-export triton MODEL --repo {where} --force)"
        )


def command(
    install: Installation,
    repo: Path,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    address: str = "127.0.0.1",
    exit_timeout: int = 10,
) -> list[str]:
    return [
        str(install.binary),
        f"--model-repository={repo.resolve()}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        f"--exit-timeout-secs={exit_timeout}",
        *install.args,
        *repository_args(repo),
    ]


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll ``url`` until it answers 200: :class:`ChildProcessError` if ``process`` exits first,
    :class:`TimeoutError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ChildProcessError(f"the server exited with status {process.returncode}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout:g} s")


class TritonServer:
    """tritonserver on a repository, as a context manager: started, ready, and always ended with its stubs."""

    def __init__(
        self,
        repo: str | os.PathLike,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        log_path: str | os.PathLike | None = None,
        extra_args: list[str] | None = None,
        exit_timeout: int = 10,
    ) -> None:
        self.repo = Path(repo)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = list(extra_args or [])
        self.exit_timeout = exit_timeout
        self.install: Installation | None = None
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    def start(self) -> TritonServer:
        if not self.repo.is_dir():
            raise FileNotFoundError(f"{self.repo}: no such model repository")
        check_repository(self.repo)
        self.install = find_tritonserver()
        argv = command(
            self.install, self.repo, self.http_port, self.grpc_port, self.metrics_port, self.address, self.exit_timeout
        )
        env = {**os.environ, **self.install.env}
        if self.log_path is not None:
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.process = subprocess.Popen(
                argv + self.extra_args,
                env=env,
                cwd=self.install.cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log or None,
                stderr=subprocess.STDOUT if self._log else None,
                start_new_session=True,  # its own process group: stop() ends the stubs with it
            )
        except BaseException:
            if self._log is not None:  # no process to stop(): close the log here
                self._log.close()
                self._log = None
            raise
        return self

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")

    def wait_ready(self, timeout: float = 60.0) -> TritonServer:
        """Poll ``/v2/health/ready`` until it answers 200; :class:`TritonFailed` if the server exits or times out."""
        try:
            wait_until_ready(f"{self.url}/v2/health/ready", self.process, timeout)
        except ChildProcessError:
            raise TritonFailed(
                f"tritonserver exited with status {self.process.returncode}:\n{self.log_tail()}"
            ) from None
        except TimeoutError:
            raise TritonFailed(f"tritonserver was not ready within {timeout:g} s:\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout``; returns the exit status."""
        proc, code = self.process, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a crashed server
            code = proc.returncode
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        for path in self.install.cleanup if self.install else []:
            shutil.rmtree(path, ignore_errors=True)
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export triton serve",
        description="Run tritonserver (on PATH, else from the nvidia-pytriton wheel) on a model repository written "
        "by 'attn-export triton', listening on 127.0.0.1. Extra tritonserver flags may follow '--'.",
    )
    p.add_argument("repo", type=Path, help="the model repository folder")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 for every one)")
    p.add_argument("--print-command", action="store_true", help="print the command and environment, do not run")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    if not args.repo.is_dir():
        print(f"attn-export triton serve: error: {args.repo}: no such model repository", file=sys.stderr)
        return 2
    try:
        check_repository(args.repo)
    except OutdatedRepository as e:
        print(f"attn-export triton serve: error: {e}", file=sys.stderr)
        return 2
    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port, args.address, extra_args=extra)
    try:
        if args.print_command:
            install = find_tritonserver()
            env = install.env
            cmd = command(install, args.repo, args.http_port, args.grpc_port, args.metrics_port, args.address)
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd + extra))
            for path in install.cleanup:
                shutil.rmtree(path, ignore_errors=True)
            return 0
        server.start()
    except TritonNotFound as e:
        print(f"attn-export triton serve: error: {e}", file=sys.stderr)
        return 3
    print(
        f"tritonserver ({server.install.source}: {server.install.binary}) on {args.repo}: HTTP {server.url}, "
        f"gRPC {args.address}:{args.grpc_port}, metrics http://{args.address}:{args.metrics_port}/metrics",
        file=sys.stderr,
    )
    stopping = []

    def _stop(signum, frame) -> None:
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = server.process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.stop()
    return 0 if stopping else code
