"""Build a TensorRT engine from an exported ONNX graph (``attn-export ... --trt``).

:func:`build_engine` parses the graph with TensorRT's ONNX parser (the attn-export plugin nodes of a
``--target trt`` graph go to the plugins of :mod:`attn_export.plugins.trt`), builds ONE optimisation
profile over every dynamic axis (the batch ``MIN:OPT:MAX``, and with ``dynamic_hw`` the height and
width over the side lengths ``MIN:OPT:MAX`` too) and writes, all atomically (a temporary file renamed
into place):

- ``<name>.engine``: the serialized engine;
- ``<name>.timing.cache``: TensorRT's timing cache, loaded before the build when present and saved
  after it, so rebuilding (another batch range, fp16, a retrained model) skips most kernel timing;
- ``<name>.engine.json``: what the engine expects and was built with (:func:`engine_metadata`, written
  and read by :mod:`attn_export.runtime.engine`).

:func:`trtexec_command` prints the equivalent ``trtexec`` build and :func:`trtexec_run_command` the
benchmark of a built engine; :func:`check_trt_environment` says what is missing for a build. The
half-precision step is :mod:`attn_export.export.trt_precision`; :func:`verify_engine` compares the
engine with PyTorch (:mod:`attn_export.export.compare`).

TensorRT is imported only inside the functions that need it.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attn_export.export import precision_graph as pg
from attn_export.export.errors import ExportError
from attn_export.export.profile import check_input_shape, parse_batch, parse_hw, profile_shapes, verify_sizes
from attn_export.export.trt_precision import convert_graph, graph_precision, low_graph_path_for, precision_plan
from attn_export.files import write_bytes
from attn_export.runtime.engine import ENGINE_FORMAT, write_engine_metadata

log = logging.getLogger("attn_export")

#: Default workspace (``MemoryPoolType.WORKSPACE``) limit in GiB.
DEFAULT_WORKSPACE_GB = 4.0
#: ``plugins`` argument of :func:`build_engine`.
PLUGIN_CHOICES = ("auto", "aot", "jit")

Progress = Callable[[str, str], None]


#: The metadata keys :meth:`EngineBuildResult.to_dict` repeats.
_SUMMARY = (
    "precision",
    "precision_detail",
    "batch",
    "dynamic_hw",
    "profile",
    "inputs",
    "outputs",
    "plugins",
    "trtexec",
)


@dataclass
class EngineBuildResult:
    """What :func:`build_engine` wrote."""

    engine_path: Path
    metadata_path: Path
    timing_cache_path: Path | None
    metadata: dict
    size_bytes: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def plugin_mode(self) -> str | None:
        return self.metadata.get("plugins", {}).get("mode")

    @property
    def precision(self) -> str:
        return self.metadata["precision"]

    @property
    def trtexec(self) -> str:
        """The trtexec command line that builds what this build built (same flags and graph)."""
        return self.metadata["trtexec"]

    def to_dict(self) -> dict:
        return {
            "engine": str(self.engine_path),
            "metadata": str(self.metadata_path),
            "timing_cache": str(self.timing_cache_path) if self.timing_cache_path else None,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            **{k: self.metadata.get(k) for k in _SUMMARY},
        }


# ------------------------------------------------------------------------------------------ paths
def timing_cache_path_for(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.timing.cache`` (beside the engine; shared by the engines of one folder
    stem, which is what a timing cache is for: it is keyed by layer, GPU and TensorRT version)."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.stem + ".timing.cache")


# ------------------------------------------------------------------------------------------ pure helpers
def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def profile_ranges(shapes: Sequence[Sequence[int]], axes: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{axis name: {"min", "opt", "max"}}`` of the named axes of a profile's (min, opt, max) shapes."""
    out = {}
    for i, name in enumerate(axes):
        if isinstance(name, str):
            out[name] = {"min": int(shapes[0][i]), "opt": int(shapes[1][i]), "max": int(shapes[2][i])}
    return out


def engine_metadata(
    *,
    engine_path: str | os.PathLike,
    onnx_path: str | os.PathLike | None,
    input_name: str,
    input_shape: Sequence[int],
    outputs: Sequence[tuple[str, Sequence[int | str]]],
    batch: Sequence[int],
    precision: str,
    plugin_mode: str | None,
    tensorrt_version: str | None,
    plugins: Mapping[str, int] | None = None,
    classes: Sequence[str] | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace_gb: float | None = None,
    input_dtype: str = "float32",
    output_dtypes: Sequence[str] | None = None,
    device: str | None = None,
    compute_capability: Sequence[int] | None = None,
    build_seconds: float | None = None,
    created: str | None = None,
    precision_detail: Mapping | None = None,
    trtexec: str | None = None,
    dynamic_hw: Sequence[int] | str | None = None,
    hw_multiple: int = 1,
) -> dict:
    """The metadata JSON written beside an engine (pure: every value is an argument).

    Shapes are lists with ``"batch"`` for the dynamic batch axis, and with ``dynamic_hw`` (side lengths
    min, opt, max) ``"height"`` and ``"width"`` for the input's spatial axes. ``profile`` is the one
    optimisation profile the engine was built with: per dynamic axis ``{"min", "opt", "max"}``
    (``batch``, ``height``, ``width``) and the input's min/opt/max shapes; ``dynamic_hw`` the side
    lengths and ``multiple_of`` (``hw_multiple``: the sides a model needs in multiples of its stride), or
    None. ``precision`` is what the engine
    computes in (``fp32``, ``tf32``, ``fp16``, ``bf16``); ``precision_detail`` how (the TensorRT mechanism
    and the fp32 layers kept by the precision step). ``plugins.mode`` is ``"aot"`` (the
    plugin kernels are compiled into the engine: it runs without Python, e.g. under trtexec), ``"jit"``
    (the engine calls back into Python: run it with :class:`attn_export.runtime.trt_runner.TensorRTRunner`)
    or None (no attn-export plugin in the graph).
    """
    from attn_export import __version__

    batch = parse_batch(batch)
    in_dims = check_input_shape(input_shape)
    hw = parse_hw(dynamic_hw) if dynamic_hw is not None else None
    shapes = profile_shapes(in_dims, batch, hw)
    in_axes: list[int | str] = ["batch", *in_dims]
    if hw is not None:
        in_axes[2:4] = ["height", "width"]

    def shape(dims: Sequence[int | str]) -> list:
        return [
            "batch" if i == 0 else (d if isinstance(d, str) or int(d) >= 0 else "dynamic") for i, d in enumerate(dims)
        ]

    out_dtypes = list(output_dtypes) if output_dtypes is not None else ["float32"] * len(outputs)
    meta = {
        "format": ENGINE_FORMAT,
        "engine": Path(engine_path).name,
        "onnx": Path(onnx_path).name if onnx_path else None,
        "inputs": [{"name": input_name, "shape": in_axes, "dtype": input_dtype}],
        "outputs": [
            {"name": name, "shape": shape(dims), "dtype": dtype}
            for (name, dims), dtype in zip(outputs, out_dtypes, strict=True)
        ],
        "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]},
        "dynamic_hw": {**dict(zip(("min", "opt", "max"), hw, strict=True)), "multiple_of": hw_multiple} if hw else None,
        "profile": {
            **profile_ranges(shapes, in_axes),
            "shapes": {input_name: {k: list(s) for k, s in zip(("min", "opt", "max"), shapes, strict=True)}},
        },
        "precision": precision,
        "precision_detail": dict(precision_detail) if precision_detail else None,
        "plugins": {"mode": plugin_mode, "nodes": dict(plugins or {})},
        "classes": list(classes) if classes is not None else None,
        "timing_cache": Path(timing_cache).name if timing_cache else None,
        "workspace_gb": workspace_gb,
        "versions": {"attn_export": __version__, "tensorrt": tensorrt_version},
        "device": {"name": device, "compute_capability": list(compute_capability) if compute_capability else None},
        "build_seconds": round(build_seconds, 3) if build_seconds is not None else None,
        "created": created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "trtexec": trtexec,
    }
    return meta


def plugin_nodes(onnx_path: str | os.PathLike) -> dict[str, int]:
    """``{plugin name: count}`` of the attn-export plugin nodes in an ONNX file (weights not loaded)."""
    import onnx

    from attn_export.plugins._trt_names import PLUGINS

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = set(PLUGINS.values())
    counts = collections.Counter(n.op_type for n in model.graph.node if n.op_type in names)
    return dict(counts)


# ------------------------------------------------------------------------------------------ environment
def check_trt_environment() -> str | None:
    """None if TensorRT engines can be built and run here, else a message saying what is missing.

    Checks: the ``tensorrt`` module (>= 10.6, for ``tensorrt.plugin``), a CUDA GPU visible to torch
    (``torch.cuda.is_available()``), and Triton (the plugins' kernels). TensorRT older than 10.9 is not
    an error (the plugins run as JIT Python plugins) but the message of :func:`build_engine` says so.
    """
    from attn_export.plugins import trt as trt_plugins

    problems = []
    try:
        trt = trt_plugins._import_tensorrt()
    except trt_plugins.TensorRTError as e:
        problems.append(str(e))
    else:
        version = trt_plugins.parse_version(trt.__version__)
        if version[:2] < trt_plugins.MIN_VERSION:
            need = ".".join(map(str, trt_plugins.MIN_VERSION))
            problems.append(
                f"TensorRT {trt.__version__} is too old: the plugins need TensorRT >= {need} (tensorrt.plugin)"
            )
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append(
                "no CUDA GPU is visible to torch (torch.cuda.is_available() is False): TensorRT builds and runs "
                "engines on an NVIDIA GPU, and the plugins hand tensors to torch on it; install a CUDA build of torch"
            )
    except ImportError:  # pragma: no cover - torch is a dependency
        problems.append("torch is not installed")
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        problems.append("Triton is not installed (pip install triton): the plugins' kernels are Triton kernels")
    if not problems:
        return None
    return "TensorRT engines cannot be built here: " + "; ".join(problems)


# ------------------------------------------------------------------------------------------ trtexec
def _installed_tensorrt_major() -> int:
    from attn_export.plugins import trt as trt_plugins

    version = trt_plugins.tensorrt_version()
    return version[0] if version else 10


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    input_name: str,
    input_shape: Sequence[int],
    batch: Sequence[int] = (1, 1, 32),
    fp16: bool = False,
    *,
    workspace_gb: float | None = DEFAULT_WORKSPACE_GB,
    timing_cache: str | os.PathLike | None = None,
    plugin_libraries: Sequence[str | os.PathLike] = (),
    tensorrt_major: int | None = None,
    bf16: bool = False,
    layer_precisions: Sequence[str] = (),
    tf32: bool = False,
    strongly_typed: bool = False,
    dynamic_hw: Sequence[int] | str | None = None,
) -> str:
    """The ``trtexec`` command line that builds the engine :func:`build_engine` builds.

    Same optimisation profile (``--minShapes/--optShapes/--maxShapes`` over the batch, and with
    ``dynamic_hw`` over the height and width too: :func:`profile_shapes`), precision, workspace and
    timing cache file. Plugins: trtexec loads plugins only from shared libraries
    (``--dynamicPlugins``, from ``plugin_libraries``); it cannot load the attn-export plugins, which are
    Python (``tensorrt.plugin``) definitions. So this command builds a graph without plugin nodes
    (``--target ort``, standard ONNX ops) as it is; for a ``--target trt`` graph, build with
    :func:`build_engine` (AOT plugins, TensorRT >= 10.9) and run that engine with
    :func:`trtexec_run_command`, which needs no plugin loading because the AOT kernels are inside it.

    ``fp16`` (``bf16``) adds ``--fp16`` (``--bf16``) on TensorRT 10, with ``layer_precisions``, the
    ``--precisionConstraints``/``--layerPrecisions``/``--layerOutputTypes`` arguments of
    :func:`attn_export.export.precision_graph.layer_precision_args` that keep the fp32 layers fp32.
    TensorRT 11 removed the precision flags (strongly typed networks only): there an fp16 engine comes
    from an fp16 ONNX graph (:func:`attn_export.export.precision_graph.convert`, which ``build_engine``
    writes beside the engine), so ``onnx_path`` must be that graph and asking for ``fp16`` raises
    ValueError. ``--noTF32`` (unless ``tf32``) on both: fp32 layers are IEEE fp32, as ``build_engine``
    builds them (TensorRT 11 keeps the TF32 builder flag and trtexec's ``--noTF32``). ``strongly_typed``
    adds ``--stronglyTyped`` on TensorRT 10 (a graph already in fp16/bf16, built as its types say).
    ``tensorrt_major`` defaults to the installed TensorRT's (10 where none is installed).
    """
    shapes = profile_shapes(input_shape, batch, dynamic_hw)
    major = tensorrt_major if tensorrt_major is not None else _installed_tensorrt_major()
    cache = Path(timing_cache) if timing_cache else timing_cache_path_for(engine_path)
    argv = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={input_name}:{_dims(shapes[0])}",
        f"--optShapes={input_name}:{_dims(shapes[1])}",
        f"--maxShapes={input_name}:{_dims(shapes[2])}",
        f"--timingCacheFile={cache}",
    ]
    if workspace_gb:
        argv.append(f"--memPoolSize=workspace:{max(1, round(workspace_gb * 1024))}M")
    if fp16 and bf16:
        raise ValueError("choose fp16 or bf16, not both")
    if fp16 or bf16:
        if major >= 11:
            raise ValueError(
                f"TensorRT 11 removed --{'fp16' if fp16 else 'bf16'} (all networks are strongly typed): convert the "
                "ONNX graph (attn_export.export.precision_graph.convert; attn-export --trt writes it beside the engine "
                "as <name>.fp16.onnx) and build that graph without the flag"
            )
        argv.append("--fp16" if fp16 else "--bf16")
        argv += list(layer_precisions)
    elif layer_precisions:
        raise ValueError("layer precisions apply to fp16 or bf16 builds")
    if strongly_typed and major < 11:
        argv.append("--stronglyTyped")  # 11 builds nothing else
    if not tf32:
        argv.append("--noTF32")  # fp32 layers are IEEE fp32, as build_engine builds them (TensorRT 10 and 11)
    argv += [f"--dynamicPlugins={lib}" for lib in plugin_libraries]
    return shlex.join(argv)


def trtexec_run_command(
    engine_path: str | os.PathLike, input_name: str, input_shape: Sequence[int], batch_size: int = 1
) -> str:
    """``trtexec --loadEngine`` benchmarking an engine at one batch size (an AOT engine needs no plugins)."""
    dims = check_input_shape(input_shape)
    return shlex.join(["trtexec", f"--loadEngine={engine_path}", f"--shapes={input_name}:{_dims((batch_size, *dims))}"])


# ------------------------------------------------------------------------------------------ build
def _make_logger(trt, messages: list[str]):
    class _Logger(trt.ILogger):
        """Keeps errors for the exception message; warnings go to the ``attn_export`` logger."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                messages.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif level == int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _make_progress_monitor(trt, say: Progress):
    """A ``tensorrt.IProgressMonitor`` reporting the top two levels of build phases, or None."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._t0: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            try:
                with self._lock:
                    depth = 0 if parent_phase is None else self._depth.get(parent_phase, 0) + 1
                    self._depth[phase_name] = depth
                    self._t0[phase_name] = time.perf_counter()
                if depth <= 1:
                    say("build", f"{'  ' * depth}{phase_name} ({num_steps} step{'s' * (num_steps != 1)})")
            except Exception:  # never let reporting break the build
                pass

        def step_complete(self, phase_name, step) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name) -> None:
            try:
                with self._lock:
                    depth = self._depth.pop(phase_name, 0)
                    t0 = self._t0.pop(phase_name, None)
                if depth == 0 and t0 is not None:
                    say("build", f"{phase_name} done in {time.perf_counter() - t0:.1f}s")
            except Exception:
                pass

    return _Monitor()


_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64"}


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    return _TRT_DTYPES.get(name, name.lower())


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    input_name: str,
    input_shape: Sequence[int],
    batch: Sequence[int] = (1, 1, 32),
    fp16: bool = False,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: str | os.PathLike | None = None,
    progress: Progress | None = None,
    *,
    classes: Sequence[str] | None = None,
    plugins: str = "auto",
    tf32: bool = False,
    bf16: bool = False,
    precision_samples: Sequence | None = None,
    dynamic_hw: Sequence[int] | str | None = None,
    hw_multiple: int = 1,
) -> EngineBuildResult:
    """Build a TensorRT engine for ``onnx_path`` with a dynamic batch; return what was written.

    ``input_shape`` is the input's shape without the batch; ``batch`` the optimisation profile's
    (MIN, OPT, MAX) batch sizes. ``dynamic_hw`` (side lengths ``(min, opt, max)``, for a graph exported
    with symbolic ``height`` and ``width``): the same one profile ranges over them as well
    (:func:`profile_shapes`); the graph's input must have them dynamic. ``hw_multiple`` (the export's:
    sides in multiples of the model's stride) is recorded in the metadata.
    ``fp16`` (``bf16``) builds in half precision with the fp32 regions the precision step
    (:mod:`attn_export.export.precision_graph`) chooses: on TensorRT 10 the fp32 graph
    with ``BuilderFlag.FP16`` (``BF16``), ``OBEY_PRECISION_CONSTRAINTS`` and those layers pinned to
    fp32; on TensorRT 11 (strongly typed only) the converted graph, written beside the engine as
    ``<name>.fp16.onnx`` (``.bf16.onnx``), fp32 in and out. The fp16 range rule measures activations on
    ``precision_samples`` (input batches; default one standard-normal batch of 1, which overestimates
    image activations: conservative). A graph that is already fp16/bf16 is built as its types say
    (TensorRT 10: a ``STRONGLY_TYPED`` network) and labelled so.
    ``workspace_gb`` caps ``MemoryPoolType.WORKSPACE``. ``timing_cache`` defaults to
    :func:`timing_cache_path_for` the engine; it is loaded when present and saved after the build.
    ``progress(stage, message)`` receives the build phases (TensorRT's ``IProgressMonitor`` where it
    has one) and the stages. ``plugins``: ``"auto"`` (AOT plugins where TensorRT >= 10.9, else JIT),
    ``"aot"`` or ``"jit"``; it only matters for graphs with attn-export plugin nodes. ``tf32`` lets
    fp32 layers use TF32 tensor cores (off: fp32 means IEEE fp32).

    The metadata records the real precision, how it was obtained (``precision_detail``) and the
    ``trtexec`` command line with the same graph, flags and layer precisions (:attr:`EngineBuildResult.trtexec`).

    Raises :class:`ExportError` for anything a user can fix (no TensorRT or GPU, bad shapes, a graph
    TensorRT rejects, a failed build); the engine file appears only after a successful build.
    """
    say = progress or (lambda stage, msg: log.info("%s: %s", stage, msg))
    t_start = time.perf_counter()
    if plugins not in PLUGIN_CHOICES:
        raise ExportError(f"plugins: choose one of {', '.join(PLUGIN_CHOICES)}, got {plugins!r}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    shapes = profile_shapes(input_shape, batch, dynamic_hw)
    batch = parse_batch(batch)
    hw = parse_hw(dynamic_hw) if dynamic_hw is not None else None
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX file")
    if engine_path.is_dir():
        raise ExportError(f"{engine_path}: is a directory; give a file path for the engine")
    if not engine_path.parent.exists():
        raise ExportError(f"{engine_path.parent}: the output folder does not exist")
    if workspace_gb <= 0:
        raise ExportError(f"workspace: expected a positive size in GiB, got {workspace_gb}")
    if fp16 and bf16:
        raise ExportError("precision: choose fp16 or bf16, not both")
    problem = check_trt_environment()
    if problem:
        raise ExportError(problem)

    import tensorrt as trt
    import torch

    from attn_export.plugins import trt as trt_plugins

    messages: list[str] = []
    nodes = plugin_nodes(onnx_path)
    mode = None
    if nodes:
        try:
            registered = trt_plugins.register_trt_plugins(aot={"auto": None, "aot": True, "jit": False}[plugins])
        except trt_plugins.TensorRTError as e:
            raise ExportError(str(e)) from e
        mode = registered
        if plugins == "jit" and registered == "aot":  # both registered: PREFER_JIT picks the JIT ones
            mode = "jit"
        listed = ", ".join(f"{k} x{v}" for k, v in nodes.items())
        say("plugins", f"{listed}: {mode.upper()} plugins (TensorRT {trt.__version__})")
        if mode == "jit":
            say("plugins", "JIT plugins call back into Python: run this engine with TensorRTRunner, not trtexec")

    low = "fp16" if fp16 else ("bf16" if bf16 else None)
    trt11 = not hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11: strongly typed only, precision is the graph's
    graph_type = graph_precision(onnx_path)  # a graph already in fp16/bf16 is built as its types say
    if low and graph_type not in ("fp32", low):
        raise ExportError(f"{onnx_path} is already a {graph_type} graph; build it without --fp16/--bf16")
    typed_graph = graph_type != "fp32"
    if typed_graph:
        low = None  # nothing to convert
    cache_path = Path(timing_cache) if timing_cache else timing_cache_path_for(engine_path)
    parse_path, plan, source = onnx_path, None, None
    if low:
        plan, source = precision_plan(onnx_path, low, input_name, shapes[1][1:], precision_samples, say)
        if trt11:
            parse_path = low_graph_path_for(engine_path, low)
            write_bytes(parse_path, convert_graph(source, plan).SerializeToString())
            say("precision", f"{low} graph for strongly typed TensorRT {trt.__version__}: {parse_path}")

    logger = _make_logger(trt, messages)
    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if nodes and hasattr(creation, "PREFER_AOT_PYTHON_PLUGINS"):
        preferred = creation.PREFER_AOT_PYTHON_PLUGINS if mode == "aot" else creation.PREFER_JIT_PYTHON_PLUGINS
        flags |= 1 << int(preferred)
    if typed_graph and not trt11:  # TensorRT 10 follows a half-precision graph's types only when told to
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say("parse", f"{parse_path} (TensorRT {trt.__version__} ONNX parser)")
    if not parser.parse_from_file(str(parse_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or messages
        hint = ""
        if any("plugin" in e.lower() for e in errors):
            hint = " (a plugin node: were the attn-export plugins registered? see docs/tensorrt.md)"
        raise ExportError(f"TensorRT cannot parse {onnx_path}{hint}: " + "; ".join(errors[:5]))

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = [t.name for t in inputs]
    if input_name not in names:
        raise ExportError(f"the graph has no input {input_name!r}; its inputs are {names}")
    if len(inputs) != 1:
        raise ExportError(f"build_engine builds single-input graphs; this one has inputs {names}")
    tensor = inputs[0]
    declared = tuple(tensor.shape)
    if len(declared) != len(shapes[0]) or any(
        d >= 0 and not lo <= d <= hi for d, lo, hi in zip(declared[1:], shapes[0][1:], shapes[2][1:], strict=True)
    ):
        given = f"{list(shapes[0][1:])}" + (f" to {list(shapes[2][1:])}" if hw else "")
        raise ExportError(
            f"input {input_name!r} is {list(declared)} in the graph (-1: dynamic), but the input shape given is {given}"
        )
    if hw is not None and any(d >= 0 for d in declared[2:4]):
        raise ExportError(
            f"input {input_name!r} has a fixed height and width ({declared[2]}x{declared[3]}) in the graph; "
            "re-export with --dynamic-hw for an engine over several sizes"
        )
    if declared[0] >= 0 and (batch[0] != declared[0] or batch[2] != declared[0]):
        raise ExportError(f"input {input_name!r} has a fixed batch of {declared[0]}; re-export with a dynamic batch")

    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    input_dtype = _dtype_name(tensor.dtype)
    layer_args: list[str] = []
    if low:
        detail = {"low": low, "fp32_nodes": len(plan.fp32), "reasons": plan.reasons()}
        if trt11:
            detail.update(mode="strongly typed graph", graph=parse_path.name)
        else:
            config.set_flag(trt.BuilderFlag.FP16 if low == "fp16" else trt.BuilderFlag.BF16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            pinned = pg.apply_layer_precisions(trt, network, plan, pg.fp32_tensors(source, plan))
            layer_args = pg.layer_precision_args(plan, names=pinned)
            detail.update(mode="layer precision constraints", fp32_layers=pinned)
        precision = low
    else:
        detail = {"mode": "graph types", "low": graph_type} if typed_graph else None
        precision = graph_type if typed_graph else ("tf32" if tf32 else "fp32")
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    trtexec = trtexec_command(
        parse_path,
        engine_path,
        input_name,
        shapes[0][1:],
        batch,
        fp16=low == "fp16" and not trt11,
        bf16=low == "bf16" and not trt11,
        workspace_gb=workspace_gb,
        timing_cache=cache_path,
        tensorrt_major=11 if trt11 else 10,
        layer_precisions=layer_args,
        tf32=tf32,
        strongly_typed=typed_graph and not trt11,
        dynamic_hw=hw,
    )

    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        say("cache", f"{cache_path} does not match this TensorRT or GPU; starting a new timing cache")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    elif blob:
        say("cache", f"reusing timing cache {cache_path} ({len(blob)} bytes)")

    monitor = _make_progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor
    dev = torch.cuda.current_device()
    device_name = torch.cuda.get_device_name(dev)
    sides = f", height and width {hw[0]}:{hw[1]}:{hw[2]}" if hw else ""
    say(
        "build",
        f"{precision}, batch {batch[0]}:{batch[1]}:{batch[2]}{sides}, input {_dims(shapes[1][1:])}, workspace "
        f"{workspace_gb:g} GiB on {device_name}" + ("" if monitor else " (no progress monitor in this TensorRT)"),
    )
    t_build = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(messages[-5:]) or "no error message from TensorRT"
        raise ExportError(f"TensorRT failed to build the engine: {detail}")
    build_seconds = time.perf_counter() - t_build
    say("build", f"engine built in {build_seconds:.1f}s")

    size = write_bytes(engine_path, serialized)
    try:
        write_bytes(cache_path, config.get_timing_cache().serialize())
    except Exception as e:  # a cache that cannot be saved costs time on the next build, nothing else
        say("cache", f"could not save the timing cache to {cache_path}: {e}")
        cache_path = None  # type: ignore[assignment]

    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    meta = engine_metadata(
        engine_path=engine_path,
        onnx_path=onnx_path,
        input_name=input_name,
        input_shape=check_input_shape(input_shape),
        outputs=[(o.name, tuple(o.shape)) for o in outputs],
        output_dtypes=[_dtype_name(o.dtype) for o in outputs],
        input_dtype=input_dtype,
        batch=batch,
        precision=precision,
        plugin_mode=mode,
        plugins=nodes,
        tensorrt_version=trt.__version__,
        classes=classes,
        timing_cache=cache_path,
        workspace_gb=workspace_gb,
        device=device_name,
        compute_capability=torch.cuda.get_device_capability(dev),
        build_seconds=build_seconds,
        precision_detail=detail,
        trtexec=trtexec,
        dynamic_hw=hw,
        hw_multiple=hw_multiple,
    )
    meta_path = write_engine_metadata(engine_path, meta)
    say(
        "write",
        f"{engine_path} ({size / 1e6:.1f} MB), {meta_path.name}" + (f", {cache_path.name}" if cache_path else ""),
    )
    return EngineBuildResult(
        engine_path, meta_path, cache_path, meta, size, time.perf_counter() - t_start, messages=list(messages)
    )


# ------------------------------------------------------------------------------------------ parity
def verify_engine(
    model,
    runner,
    input_name: str,
    input_shape: Sequence[int],
    batches: Sequence[int],
    output_names: Sequence[str],
    atol: float,
    rtol: float,
    seed: int | None = None,
    dynamic_hw: Sequence[int] | str | None = None,
    hw_multiple: int = 1,
):
    """The engine's parity report: PyTorch and a built engine (any
    :class:`~attn_export.runtime.runners.Runner`) compared by :func:`attn_export.export.compare.compare_runners`.

    With ``dynamic_hw`` every batch runs at every size of :func:`attn_export.export.profile.verify_sizes`
    (min, opt, max, an odd and a non-square one; in multiples of ``hw_multiple``), one report row each."""
    from attn_export.export.compare import compare_runners
    from attn_export.runtime.runners import TorchRunner

    backend = f"TensorRT engine ({runner.describe()})"
    reference = TorchRunner(model, [input_name], list(output_names))
    cases = None
    if dynamic_hw is not None:
        channels = check_input_shape(input_shape)[0]
        sizes = verify_sizes(parse_hw(dynamic_hw), hw_multiple)
        cases = [(int(b), {input_name: (channels, h, w)}) for h, w in sizes for b in batches]
    return compare_runners(
        reference,
        runner,
        backend,
        input_name,
        input_shape,
        batches,
        output_names,
        atol,
        rtol,
        seed,
        cases=cases,
        sized=cases is not None,
    )
