"""TensorRT's real ``tensorrt.plugin`` Python sources on a machine without TensorRT, for the tests.

``tensorrt.plugin`` is pure Python shipped inside the ``tensorrt-cu13-bindings`` wheel (about 1.3 MB,
``tensorrt_bindings/plugin/``); only the ``tensorrt`` module under it is compiled. :func:`bindings_dir`
downloads the wheel once (``pip download --no-deps``) into a cache folder and unpacks the plugin
sources; :func:`stub_tensorrt` builds a stand-in for the compiled ``tensorrt`` module, with just the
classes and enums ``tensorrt.plugin`` touches, so the real registration, validation, autotune
expansion, plugin creator and AOT launch-parameter code run against our plugins.

The stand-in computes shape expressions with plain ints (:class:`ExprBuilder`), records what a
builder, network, parser and config are told (:class:`Builder` and friends, for ``build_engine``),
and nothing more: it never runs a kernel. ``TENSORRT_BINDINGS_WHEEL`` names a wheel file to use
instead of downloading; ``ATTN_EXPORT_TEST_CACHE`` the cache folder (default ``~/.cache/attn-export``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "tensorrt-cu13-bindings"
#: The version the tests were written against (the 11.x plugin sources; 10.x has the same API).
WHEEL_VERSION = "11.4.0.106"


class Unavailable(RuntimeError):
    """The bindings wheel could not be had (no network, no pip); the tests skip with this message."""


def _cache() -> Path:
    root = os.environ.get("ATTN_EXPORT_TEST_CACHE") or Path.home() / ".cache" / "attn-export"
    return Path(root) / "tensorrt-bindings"


def bindings_dir() -> Path:
    """A folder holding ``plugin/`` (the wheel's ``tensorrt_bindings/plugin``), downloaded once and cached."""
    cache = _cache()
    target = cache / WHEEL_VERSION / "tensorrt_bindings"
    if (target / "plugin" / "_lib.py").is_file():
        return target
    wheel = os.environ.get("TENSORRT_BINDINGS_WHEEL")
    if not wheel:
        found = sorted(cache.glob("tensorrt_cu13_bindings-*.whl"))
        if not found:
            cache.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
            cmd += ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", f"{WHEEL}=={WHEEL_VERSION}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise Unavailable(f"could not download {WHEEL} ({e})") from e
            found = sorted(cache.glob("tensorrt_cu13_bindings-*.whl"))
            if proc.returncode != 0 or not found:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise Unavailable(f"could not download {WHEEL}=={WHEEL_VERSION} from PyPI: {tail[0]}")
        wheel = str(found[-1])
    tmp = target.parent.with_name(f".{WHEEL_VERSION}.{os.getpid()}")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("tensorrt_bindings/plugin/") and name.endswith(".py"):
                z.extract(name, tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # another process unpacked it first
        os.replace(tmp / "tensorrt_bindings", target)
    return target


# ------------------------------------------------------------------------------------------ the stand-in
def _enum(name: str, members: str) -> type[enum.Enum]:
    return enum.Enum(name, [(m, i) for i, m in enumerate(members.split())])


class IDimensionExpr:
    """A dimension expression that is always a known int here."""

    def __init__(self, value: int) -> None:
        self.value = int(value)

    def is_constant(self) -> bool:
        return True

    def get_constant_value(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"Expr({self.value})"


class ExprBuilder:
    """``IExprBuilder`` on ints; counts the operations it was asked for."""

    def __init__(self, trt) -> None:
        self.trt = trt
        self.ops = 0

    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(value)

    def operation(self, op, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        self.ops += 1
        D = self.trt.DimensionOperation
        x, y = a.value, b.value
        table = {
            D.SUM: lambda: x + y,
            D.SUB: lambda: x - y,
            D.PROD: lambda: x * y,
            D.FLOOR_DIV: lambda: x // y,
            D.CEIL_DIV: lambda: -(-x // y),
            D.MAX: lambda: max(x, y),
            D.MIN: lambda: min(x, y),
            D.EQUAL: lambda: int(x == y),
            D.LESS: lambda: int(x < y),
        }
        return IDimensionExpr(table[op]())


class _Base:
    def __init__(self, *args, **kwargs) -> None:
        pass


class PluginField:
    def __init__(self, name: str = "", data=None, type=None) -> None:
        self.name, self.data, self.type = name, data, type


class PluginRegistry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], object] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str):
        return self.creators.get((name, version, namespace))


class PluginTensorDesc:
    def __init__(self) -> None:
        self.dims, self.type, self.format, self.scale = (), None, None, 1.0


class DynamicPluginTensorDesc:
    def __init__(self, dims=(), dtype=None, fmt=None) -> None:
        self.desc = PluginTensorDesc()
        self.desc.dims, self.desc.type, self.desc.format = tuple(dims), dtype, fmt
        self.min = self.opt = self.max = tuple(dims)


class Holder:
    """Anything TensorRT hands a plugin to fill in (launch parameters, symbolic-argument setters)."""

    def __init__(self) -> None:
        self.items: dict[int, object] = {}

    def __setitem__(self, index: int, value) -> None:
        self.items[index] = value


def stub_tensorrt(version: str = WHEEL_VERSION, *, aot: bool = True) -> types.ModuleType:
    """A ``tensorrt`` module for ``tensorrt.plugin`` (from :func:`bindings_dir`) and ``build_engine``.

    ``version`` sets ``__version__`` and the precision API: 10.x has ``BuilderFlag.FP16``/``BF16`` and
    ``OBEY_PRECISION_CONSTRAINTS``; 11.x has none of them (strongly typed only). ``aot`` gives the
    ``QuickPluginCreationRequest`` that ``tensorrt.plugin`` looks for to enable ``aot_impl``.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__path__ = [str(bindings_dir())]  # `import tensorrt.plugin` finds the wheel's sources
    major = int(version.split(".")[0])
    trt.DataType = _enum("DataType", "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8 INT4 FP4")
    D = trt.DataType
    trt.float32, trt.float16, trt.bfloat16, trt.int8, trt.int32 = D.FLOAT, D.HALF, D.BF16, D.INT8, D.INT32
    trt.int64, trt.bool, trt.uint8, trt.fp8, trt.int4, trt.fp4 = D.INT64, D.BOOL, D.UINT8, D.FP8, D.INT4, D.FP4
    np_types = {D.FLOAT: np.float32, D.HALF: np.float16, D.INT8: np.int8, D.INT32: np.int32, D.INT64: np.int64}

    def nptype(dtype):
        if dtype in np_types:
            return np_types[dtype]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    trt.nptype = nptype
    trt.TensorFormat = _enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR")
    trt.PluginFieldType = _enum("PluginFieldType", "FLOAT16 FLOAT32 FLOAT64 INT8 INT16 INT32 CHAR DIMS UNKNOWN INT64")
    trt.DimensionOperation = _enum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV")
    trt.PluginArgType = _enum("PluginArgType", "INT")
    trt.PluginArgDataType = _enum("PluginArgDataType", "INT8 INT16 INT32")
    trt.TensorRTPhase = _enum("TensorRTPhase", "BUILD RUNTIME")
    trt.TensorIOMode = _enum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM TACTIC_SHARED_MEMORY")
    trt.LayerType = _enum("LayerType", "CONVOLUTION ACTIVATION SOFTMAX MATRIX_MULTIPLY REDUCE PLUGIN_V3 OTHER")
    if aot:
        trt.QuickPluginCreationRequest = _enum(
            "QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT"
        )
    flags = "FP16 BF16 INT8 TF32 OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS" if major < 11 else "TF32"
    trt.BuilderFlag = _enum("BuilderFlag", flags + " REFIT DIRECT_IO")
    creation = "STRONGLY_TYPED PREFER_AOT_PYTHON_PLUGINS PREFER_JIT_PYTHON_PLUGINS"
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", creation)
    for name in (
        "IPluginV3",
        "IPluginV3QuickCore",
        "IPluginV3QuickBuild",
        "IPluginV3QuickRuntime",
        "IPluginV3QuickAOTBuild",
        "IPluginCreatorV3Quick",
        "ISymExpr",
        "ITensor",
        "IProgressMonitor",
    ):
        setattr(trt, name, type(name, (_Base,), {}))

    class ILogger(_Base):
        Severity = _enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

    class Logger(ILogger):
        WARNING = ILogger.Severity.WARNING

        def log(self, severity, msg) -> None:
            pass

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.IDimensionExpr = IDimensionExpr
    trt.PluginField = PluginField
    trt.PluginFieldCollection = list
    registry = PluginRegistry()
    trt.get_plugin_registry = lambda: registry
    trt.Dims = type("Dims", (tuple,), {"MAX_DIMS": 8})
    trt.DimsExprs = lambda n: [None] * n
    trt.PluginTensorDesc = PluginTensorDesc
    trt.DynamicPluginTensorDesc = DynamicPluginTensorDesc
    return trt


@contextlib.contextmanager
def installed(version: str = WHEEL_VERSION, *, aot: bool = True):
    """:func:`stub_tensorrt` as ``tensorrt`` with the real ``tensorrt.plugin`` imported against it, for the
    ``with`` block; every ``tensorrt`` module there was before is put back after it (a fresh registry each time)."""
    import importlib

    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "tensorrt" or m.startswith("tensorrt.")}
    try:
        trt = sys.modules["tensorrt"] = stub_tensorrt(version, aot=aot)
        with warnings.catch_warnings():  # the wheel's docstrings have invalid escapes: not ours to fix
            warnings.simplefilter("ignore", DeprecationWarning)
            trtp = importlib.import_module("tensorrt.plugin")
        yield trt, trtp
    finally:
        for m in [m for m in sys.modules if m == "tensorrt" or m.startswith("tensorrt.")]:
            del sys.modules[m]
        sys.modules.update(saved)
