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
import shutil
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
            cmd += ["--timeout", "15", "--retries", "1", "--disable-pip-version-check"]  # short when offline
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
    shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------ the stand-in
def _enum(name: str, members: str, base: type[enum.Enum] = enum.Enum) -> type[enum.Enum]:
    return base(name, [(m, i) for i, m in enumerate(members.split())])


class IDimensionExpr:
    """A dimension expression that is a known int (TensorRT's constant expressions)."""

    def __init__(self, value: int) -> None:
        self.value = int(value)

    def is_constant(self) -> bool:
        return True

    def get_constant_value(self) -> int:
        return self.value

    def evaluate(self, sizes: dict[str, int]) -> int:
        """The value at run time: a constant is itself."""
        return self.value

    def __repr__(self) -> str:
        return f"Expr({self.value})"


class SymbolicDimExpr(IDimensionExpr):
    """A dimension known only at run time (a dynamic axis of the profile, or an expression of one):
    not a constant, as TensorRT's are not; :meth:`evaluate` gives its value for the run-time sizes
    ``{name: int}`` (e.g. ``{"B": 2, "H": 13, "W": 10}``)."""

    def __init__(self, fn, text: str) -> None:
        self._fn, self.text = fn, text

    @property
    def value(self) -> int:
        raise TypeError(f"{self.text} is not a constant: evaluate it with run-time sizes")

    def is_constant(self) -> bool:
        return False

    def get_constant_value(self) -> int:
        raise RuntimeError(f"{self.text} is not a constant")

    def evaluate(self, sizes: dict[str, int]) -> int:
        return int(self._fn(sizes))

    def __repr__(self) -> str:
        return f"Sym({self.text})"


def symbol(name: str) -> SymbolicDimExpr:
    """A dynamic dimension named ``name``."""
    return SymbolicDimExpr(lambda sizes: sizes[name], name)


class ExprBuilder:
    """``IExprBuilder`` on ints, and on symbolic expressions (:class:`SymbolicDimExpr`) where an operand
    is one; counts the operations it was asked for."""

    def __init__(self, trt) -> None:
        self.trt = trt
        self.ops = 0

    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(value)

    def _fn(self, op):
        D = self.trt.DimensionOperation
        return {
            D.SUM: lambda x, y: x + y,
            D.SUB: lambda x, y: x - y,
            D.PROD: lambda x, y: x * y,
            D.FLOOR_DIV: lambda x, y: x // y,
            D.CEIL_DIV: lambda x, y: -(-x // y),
            D.MAX: max,
            D.MIN: min,
            D.EQUAL: lambda x, y: int(x == y),
            D.LESS: lambda x, y: int(x < y),
        }[op]

    def operation(self, op, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        self.ops += 1
        fn = self._fn(op)
        if a.is_constant() and b.is_constant():
            return IDimensionExpr(fn(a.value, b.value))
        text = f"{op.name}({a!r}, {b!r})"
        return SymbolicDimExpr(lambda sizes: fn(a.evaluate(sizes), b.evaluate(sizes)), text)


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
    trt.BuilderFlag = _enum("BuilderFlag", flags + " REFIT DIRECT_IO", enum.IntEnum)  # int(flag), as TensorRT's
    creation = "STRONGLY_TYPED PREFER_AOT_PYTHON_PLUGINS PREFER_JIT_PYTHON_PLUGINS"
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", creation, enum.IntEnum)
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
    trt.Builder = lambda logger: Builder(trt)
    trt.OnnxParser = lambda network, logger: OnnxParser(trt, network)
    return trt


# ------------------------------------------------------------------------------------------ build recorders
class Tensor:
    def __init__(self, name: str, shape, dtype) -> None:
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class Layer:
    """A parsed layer: its name (the ONNX node's), outputs, and the precision settings it was given."""

    def __init__(self, name: str, outputs: list[Tensor]) -> None:
        self.name, self._outputs = name, outputs
        self.precision = None
        self.output_types: dict[int, object] = {}

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, k: int) -> Tensor:
        return self._outputs[k]

    def set_output_type(self, k: int, dtype) -> None:
        self.output_types[k] = dtype


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.layers: list[Layer] = []
        self.parsed: str | None = None

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i: int) -> Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> Tensor:
        return self.outputs[i]

    def get_layer(self, i: int) -> Layer:
        return self.layers[i]


class OnnxParser:
    """Parses an ONNX file into one :class:`Layer` per node (named after it), typed from the graph."""

    num_errors = 0

    def __init__(self, trt, network: Network) -> None:
        self.trt, self.network = trt, network

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path)
        model = onnx.shape_inference.infer_shapes(model)
        T = onnx.TensorProto
        D = self.trt.DataType
        table = {T.FLOAT: D.FLOAT, T.FLOAT16: D.HALF, T.BFLOAT16: D.BF16, T.INT64: D.INT64, T.INT32: D.INT32}
        table[T.BOOL] = D.BOOL
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
        types.update({i.name: i.data_type for i in model.graph.initializer})

        def dims(v):
            return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

        net = self.network
        net.parsed = path
        net.inputs = [Tensor(i.name, dims(i), table[i.type.tensor_type.elem_type]) for i in model.graph.input]
        for n in model.graph.node:
            outs = [Tensor(o, (), table.get(types.get(o), D.FLOAT)) for o in n.output if o]
            net.layers.append(Layer(n.name, outs))
        net.outputs = [Tensor(o.name, dims(o), table[o.type.tensor_type.elem_type]) for o in model.graph.output]
        return True

    def get_error(self, i: int):  # pragma: no cover - never called: parsing never fails here
        raise IndexError(i)


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class TimingCache:
    def serialize(self) -> bytes:
        return b"timing cache"


class Config:
    def __init__(self, trt) -> None:
        self.trt = trt
        self.flags = {trt.BuilderFlag.TF32}  # TensorRT's default: TF32 on
        self.pools: dict = {}
        self.profiles: list[Profile] = []
        self.progress_monitor = None

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob: bytes) -> TimingCache:
        return TimingCache()

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        return True

    def get_timing_cache(self) -> TimingCache:
        return TimingCache()


class Builder:
    """Records the network and config it builds; the "engine" is a few bytes."""

    def __init__(self, trt) -> None:
        self.trt = trt
        self.built: list[tuple[Network, Config]] = []

    def create_network(self, flags: int = 0) -> Network:
        return Network(flags)

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def create_builder_config(self) -> Config:
        return Config(self.trt)

    def build_serialized_network(self, network: Network, config: Config) -> bytes:
        self.built.append((network, config))
        BUILDS.append((network, config))
        return b"serialized engine"


#: Every (network, config) a stand-in builder built, in order (tests clear it).
BUILDS: list[tuple[Network, Config]] = []


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
