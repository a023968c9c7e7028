"""Write a Triton Inference Server model repository for a detector (``attn-export triton MODEL``).

Every repository answers the contract of :mod:`attn_export.detection.contract` under the model name
``<name>`` (the checkpoint's stem by default), so a client cannot tell the backends apart:

=================  ==========================================================================================
``--backend``      what is written
=================  ==========================================================================================
``python``         ``<name>/``: one Python-backend model (:class:`attn_export.triton_server.model.Detector`):
                   decode, letterbox, the network (``1/model.onnx`` on onnxruntime, or ``1/model.plan``, a
                   TensorRT engine), NMS; dynamic batching on. Runs anywhere tritonserver does.
``onnxruntime``    ``<name>_network/`` (``1/model.onnx`` on Triton's native onnxruntime backend),
                   ``<name>_preprocess/`` and ``<name>_postprocess/`` (Python backend) and ``<name>/``, the
                   ensemble that chains them.
``tensorrt``       the same with ``<name>_network/1/model.plan`` on Triton's TensorRT backend (an AOT engine
                   from ``attn-export MODEL.pt --trt``; plugin libraries given with ``--plugin-lib`` are
                   copied to ``plugins/`` and the server flags that load them to ``tritonserver.args``).
=================  ==========================================================================================

Each ``config.pbtxt`` states the names, types and dims of the graph (without the batch axis) and a
``max_batch_size`` within its batch profile. Nothing is written unless everything is: the models are
built in a staging folder inside the repository and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attn_export.detection.contract import (
    CONFIG_TYPES,
    Enum,
    Params,
    contract_io,
    model_config,
    string_parameters,
    to_pbtxt,
)
from attn_export.detection.heads import DEFAULT_STRIDE, HeadError, choose_head, class_count
from attn_export.triton_server.launcher import ARGS_FILE

BACKENDS = ("python", "onnxruntime", "tensorrt")
DEFAULT_INPUT_SIZE = 320
DEFAULT_MAX_BATCH = 8
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
_NUMPY_TO_V2 = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8"}


class RepositoryError(RuntimeError):
    """The repository cannot be written as asked; the message says why and what to do."""


MODEL_PY = '''"""Triton Python-backend model written by attn-export {version}: {what}.

The implementation is attn_export.triton_server.model.{cls}; attn_export must be importable in
tritonserver's Python stub. Directories in ATTN_EXPORT_SITE_DIRS (os.pathsep-separated) are added as
site directories first, so .pth files there (an editable install, say) take effect.
"""

import os
import site

for _folder in os.environ.get("ATTN_EXPORT_SITE_DIRS", "").split(os.pathsep):
    if _folder:
        site.addsitedir(_folder)

from attn_export.triton_server.model import {cls} as TritonPythonModel  # noqa: E402

__all__ = ["TritonPythonModel"]
'''


@dataclass
class Network:
    """The graph or engine that a repository runs, as Triton must declare it."""

    path: Path
    kind: str  # "onnx" or "engine"
    input_name: str
    input_dims: list[int]  # without the batch axis: 3, S, S (3, -1, -1: free height and width)
    input_type: str  # v2 datatype
    output_name: str
    output_dims: list[int]  # N, 4 + C (-1 where the graph leaves it open); the head's layout
    output_type: str
    class_names: list[str]
    max_batch: int | None  # the batch profile's maximum, where the model has one
    plugin_mode: str | None = None
    custom_ops: list[str] = field(default_factory=list)
    head: str = "contract"  # how the output reads (attn_export.detection.heads)
    stride: int = DEFAULT_STRIDE
    size: int | None = None  # the letterbox size of a graph with free height and width
    min_side: int = 0  # its smallest verified side (the export's dynamic_hw minimum)

    @property
    def rect(self) -> bool:
        """Free height and width: each image letterboxed to its own rectangle of whole strides."""
        return self.input_dims[-1] == -1 and self.input_dims[-2] == -1

    @property
    def input_size(self) -> int:
        return int(self.size or DEFAULT_INPUT_SIZE) if self.rect else int(self.input_dims[-1])

    @property
    def num_classes(self) -> int:
        n = class_count(self.head, [None, *(None if d == -1 else d for d in self.output_dims)])
        return -1 if n is None else n

    @property
    def model_file(self) -> str:
        """The file name it has in a model's version folder."""
        return "model.plan" if self.kind == "engine" else "model.onnx"


@dataclass
class Repository:
    """What :func:`write_repository` wrote."""

    path: Path
    name: str
    backend: str
    max_batch: int
    models: list[str]
    files: list[Path]
    server_args: list[str]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ the network
def _names(value) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [t.strip() for t in value.split(",") if t.strip()]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _onnx_dims(value_info) -> tuple[list[int | None], str]:
    from onnx import helper

    t = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    np_type = str(helper.tensor_dtype_to_np_dtype(t.elem_type))
    return dims, _NUMPY_TO_V2.get(np_type, np_type.upper())


def onnx_network(path: Path, class_names: Sequence[str] | None = None, forced_head: str | None = None) -> Network:
    """Names, types and dims of an ONNX detector graph (one image input; its first output is read, by the
    head ``forced_head`` or the one :func:`~attn_export.detection.heads.choose_head` finds)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise RepositoryError(f"{path}: not an ONNX graph onnx can read ({e})") from e
    graph = model.graph
    init = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise RepositoryError(
            f"{path}: a detector graph has one image input and a (batch, N, 4 + classes) output; this one has "
            f"inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}"
        )
    in_dims, in_type = _onnx_dims(inputs[0])
    out_dims, out_type = _onnx_dims(graph.output[0])  # the first output: YOLO's decoded one
    free_hw = len(in_dims) == 4 and in_dims[1] is not None and in_dims[2] is None and in_dims[3] is None
    if len(in_dims) != 4 or in_dims[1] is None or (not free_hw and (None in in_dims[2:] or in_dims[2] != in_dims[3])):
        raise RepositoryError(
            f"{path}: the input must be (batch, 3, S, S) with S fixed, or (batch, 3, height, width) with both free; "
            f"it is {in_dims}"
        )
    props = {p.key: p.value for p in model.metadata_props}
    if len(out_dims) != 3:
        raise RepositoryError(f"{path}: the output must be (batch, N, 4 + classes) or a YOLO head's; it is {out_dims}")
    try:
        head = choose_head(out_dims, props, forced_head)
    except HeadError as e:
        raise RepositoryError(f"{path}: {e}") from e
    if in_dims[0] is not None:
        raise RepositoryError(
            f"{path}: the graph has a fixed batch of {in_dims[0]}; Triton's dynamic batcher needs a dynamic batch "
            "axis: export it with attn-export"
        )
    names = list(class_names or _names(props.get("classes", "")))
    batch = {}
    if "batch" in props:
        try:
            batch = json.loads(props["batch"])
        except ValueError:
            batch = {}
    custom = sorted({n.domain for n in graph.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml")})
    return Network(
        path=path,
        kind="onnx",
        input_name=inputs[0].name,
        input_dims=[-1 if d is None else int(d) for d in in_dims[1:]],
        input_type=in_type,
        output_name=graph.output[0].name,
        output_dims=[-1 if d is None else int(d) for d in out_dims[1:]],
        output_type=out_type,
        class_names=names,
        max_batch=int(batch["max"]) if isinstance(batch, dict) and batch.get("max") else None,
        custom_ops=custom,
        head=head,
        stride=_positive(props.get("stride")) or DEFAULT_STRIDE,
        size=_positive(props.get("input_size")),
        min_side=_hw_min(props.get("dynamic_hw")),
    )


def _hw_min(value) -> int:
    try:
        value = json.loads(value) if isinstance(value, str) else value
        return _positive(value.get("min")) or 0
    except (TypeError, ValueError, AttributeError):
        return 0


def _positive(value) -> int | None:
    try:
        n = int(json.loads(value) if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def engine_network(path: Path, class_names: Sequence[str] | None = None, forced_head: str | None = None) -> Network:
    """A TensorRT engine's I/O from the metadata file attn-export writes beside it (``ENGINE.json``)."""
    meta_path = path.with_name(path.name + ".json")
    if not meta_path.is_file():
        raise RepositoryError(
            f"{path}: no metadata file {meta_path.name} beside the engine; build the engine with "
            "'attn-export MODEL.pt --trt' (it writes both)"
        )
    meta = json.loads(meta_path.read_text())
    (inp,) = meta["inputs"][:1]
    out = meta["outputs"][0]

    def dims(shape) -> list[int]:
        return [-1 if isinstance(d, str) else int(d) for d in shape[1:]]

    return Network(
        path=path,
        kind="engine",
        input_name=inp["name"],
        input_dims=dims(inp["shape"]),
        input_type=_NUMPY_TO_V2.get(inp.get("dtype", "float32"), "FP32"),
        output_name=out["name"],
        output_dims=dims(out["shape"]),
        output_type=_NUMPY_TO_V2.get(out.get("dtype", "float32"), "FP32"),
        class_names=list(class_names or meta.get("classes") or []),
        max_batch=int(meta["batch"]["max"]),
        plugin_mode=(meta.get("plugins") or {}).get("mode"),
        head=_head([None, *dims(out["shape"])], meta, forced_head, path),
        min_side=_hw_min(meta.get("dynamic_hw")),
        stride=_positive(meta.get("stride")) or DEFAULT_STRIDE,
        size=_positive(meta.get("input_size")),
    )


def _head(shape, meta, forced_head, path) -> str:
    try:
        return choose_head([None if d == -1 else d for d in shape], meta, forced_head)
    except HeadError as e:
        raise RepositoryError(f"{path}: {e}") from e


def export_network(
    checkpoint: Path,
    folder: Path,
    max_batch: int,
    verify: bool = True,
    progress: Callable[[str, str], None] | None = None,
    dynamic_hw: tuple[int, int, int] | None = None,
    forced_head: str | None = None,
) -> Network:
    """Export a checkpoint to ``folder/<stem>.onnx`` (dynamic batch, verified at 1 and ``max_batch``; with
    ``dynamic_hw`` free height and width over that range)."""
    from attn_export.detection.loader import export_metadata
    from attn_export.export import ExportError, export_onnx, load_model

    try:
        loaded = load_model(checkpoint)
        if not loaded.input_shape:
            raise RepositoryError(
                f"{checkpoint}: the checkpoint holds no input shape; export it with attn-export first"
            )
        batch = (1, min(4, max_batch), max_batch)
        meta = {
            **export_metadata(loaded.model, loaded.meta, loaded.input_shape),
            "batch": {"min": 1, "opt": batch[1], "max": max_batch},
        }
        extra = {"dynamic_hw": tuple(dynamic_hw)} if dynamic_hw else {}
        result = export_onnx(
            loaded.model, folder / f"{checkpoint.stem}.onnx", loaded.input_shape, batch=batch, verify=verify,
            progress=progress, metadata=meta, **extra,
        )  # fmt: skip
    except ExportError as e:
        raise RepositoryError(f"cannot export {checkpoint} to ONNX: {e}") from e
    if not result.ok:
        raise RepositoryError(f"the ONNX export of {checkpoint} failed verification against PyTorch")
    return onnx_network(result.path, forced_head=forced_head)


def load_network(
    model: Path,
    staging: Path,
    max_batch: int | None,
    class_names: Sequence[str] | None = None,
    verify: bool = True,
    progress: Callable[[str, str], None] | None = None,
    dynamic_hw: tuple[int, int, int] | None = None,
    forced_head: str | None = None,
) -> Network:
    from attn_export.detection.loader import checkpoint_meta, model_kind

    if not model.is_file():
        raise RepositoryError(f"{model}: no such file")
    kind = "engine" if model.suffix.lower() in ENGINE_SUFFIXES else model_kind(model)
    if kind == "checkpoint":
        net = export_network(model, staging, max_batch or DEFAULT_MAX_BATCH, verify, progress, dynamic_hw, forced_head)
    elif dynamic_hw:
        raise RepositoryError(f"--dynamic-hw exports a checkpoint; {model} is already a {kind}")
    elif kind == "engine":
        net = engine_network(model, class_names, forced_head)
    else:
        net = onnx_network(model, class_names, forced_head)
        if not net.class_names:
            for suffix in (".pt", ".pth", ".ckpt"):
                sibling = model.with_suffix(suffix)
                if sibling.is_file():
                    net.class_names = _names(checkpoint_meta(sibling).get("classes") or [])
                    break
    if class_names:
        net.class_names = list(class_names)
    return net


# ------------------------------------------------------------------------------------------ configs
def _io(name: str, datatype: str, dims: Sequence[int]) -> dict:
    return {"name": name, "data_type": Enum(CONFIG_TYPES.get(datatype, f"TYPE_{datatype}")), "dims": list(dims)}


def _reading(net: Network) -> dict:
    """How the Python steps read the network: its head, and the rect letterbox's stride where H and W are free."""
    rect = {"stride": net.stride, "min_side": net.min_side} if net.rect else {}
    return {"head": net.head, **rect}


def _class_names(net: Network) -> list[str]:
    names = list(net.class_names)[: net.num_classes] if net.num_classes > 0 else list(net.class_names)
    return names + [f"class{i}" for i in range(len(names), max(net.num_classes, 0))]


def python_configs(
    name: str, net: Network, max_batch: int, instances: int, kind: str, defaults: Params, delay_us: int, extra: dict
) -> dict[str, tuple[dict, str]]:
    """``{model name: (config, model.py class)}`` for the one-model Python-backend repository."""
    params = {"model_file": net.model_file, "network_max_batch": net.max_batch or max_batch, **_reading(net), **extra}
    config = model_config(
        name, max_batch=max_batch, class_names=_class_names(net), input_size=net.input_size, defaults=defaults,
        instances=instances, instance_kind=kind, max_queue_delay_us=delay_us, parameters=params,
    )  # fmt: skip
    return {name: (config, "Detector")}


def ensemble_configs(
    name: str,
    net: Network,
    backend: str,
    max_batch: int,
    instances: int,
    kind: str,
    defaults: Params,
    delay_us: int,
    extra: dict,
) -> dict[str, tuple[dict, str | None]]:
    """The ensemble: ``<name>_preprocess`` -> ``<name>_network`` -> ``<name>_postprocess``, exposed as ``<name>``."""
    from attn_export.triton_server.model import LETTERBOX, LETTERBOX_DIMS

    pre, network, post = f"{name}_preprocess", f"{name}_network", f"{name}_postprocess"
    contract_in, contract_out = contract_io(defaults.max_det)
    names = _class_names(net)
    common = {"class_names": names, "input_size": net.input_size, **_reading(net)}
    group = [{"count": int(instances), "kind": Enum(kind)}]
    cpu_group = [{"count": int(instances), "kind": Enum("KIND_CPU")}]
    net_in = _io(net.input_name, net.input_type, net.input_dims)
    net_out = _io(net.output_name, net.output_type, net.output_dims)
    geometry = _io(LETTERBOX, "FP32", LETTERBOX_DIMS)
    pre_cfg = {
        "name": pre, "backend": "python", "max_batch_size": max_batch,
        "input": contract_in, "output": [net_in, geometry],
        "instance_group": cpu_group,
        "parameters": string_parameters({**common, "network_input": net.input_name, **extra}),
    }  # fmt: skip
    net_cfg = {
        "name": network, "platform": "onnxruntime_onnx" if backend == "onnxruntime" else "tensorrt_plan",
        "max_batch_size": max_batch, "input": [net_in], "output": [net_out], "default_model_filename": net.model_file,
        "dynamic_batching": {"max_queue_delay_microseconds": int(delay_us)}, "instance_group": group,
    }  # fmt: skip
    post_params = {**common, "conf": defaults.conf, "iou": defaults.iou, "max_det": defaults.max_det}
    post_cfg = {
        "name": post, "backend": "python", "max_batch_size": max_batch,
        "input": [net_out, geometry], "output": contract_out,
        "instance_group": cpu_group,
        "parameters": string_parameters({**post_params, "network_output": net.output_name}),
    }  # fmt: skip
    steps = [
        {"model_name": pre, "model_version": -1, "input_map": {"image": "image"},
         "output_map": {net.input_name: "network_input", LETTERBOX: "letterbox"}},
        {"model_name": network, "model_version": -1, "input_map": {net.input_name: "network_input"},
         "output_map": {net.output_name: "network_output"}},
        {"model_name": post, "model_version": -1,
         "input_map": {net.output_name: "network_output", LETTERBOX: "letterbox"},
         "output_map": {o["name"]: o["name"] for o in contract_out}},
    ]  # fmt: skip
    ens = model_config(name, max_batch=max_batch, class_names=names, input_size=net.input_size, defaults=defaults)
    ens = {
        "name": name, "platform": "ensemble", "max_batch_size": max_batch, "input": ens["input"],
        "output": ens["output"], "ensemble_scheduling": {"step": steps}, "parameters": ens["parameters"],
    }  # fmt: skip
    return {pre: (pre_cfg, "Preprocess"), network: (net_cfg, None), post: (post_cfg, "Postprocess"), name: (ens, None)}


# ------------------------------------------------------------------------------------------ writing
def write_repository(
    model: str | os.PathLike,
    repo: str | os.PathLike,
    *,
    backend: str = "python",
    name: str | None = None,
    max_batch: int | None = None,
    instances: int = 1,
    kind: str = "cpu",
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 100,
    max_queue_delay_us: int = 5000,
    threads: int | None = None,
    class_names: Sequence[str] | None = None,
    plugin_libs: Sequence[str | os.PathLike] = (),
    force: bool = False,
    verify: bool = True,
    progress: Callable[[str, str], None] | None = None,
    head: str | None = None,
    dynamic_hw: tuple[int, int, int] | None = None,
) -> Repository:
    """Write the model repository for ``model`` (a checkpoint, an ONNX graph or a TensorRT engine) into ``repo``.

    Raises :class:`RepositoryError` (and leaves ``repo`` as it was) when it cannot.
    """
    model, repo = Path(model), Path(repo)
    if backend not in BACKENDS:
        raise RepositoryError(f"--backend: choose one of {', '.join(BACKENDS)}, not {backend!r}")
    if max_batch is not None and max_batch < 1:
        raise RepositoryError(f"--max-batch must be at least 1, got {max_batch}")
    if instances < 1:
        raise RepositoryError(f"--instances must be at least 1, got {instances}")
    if kind not in ("cpu", "gpu"):
        raise RepositoryError(f"--kind: cpu or gpu, not {kind!r}")
    if not (0 <= conf <= 1 and 0 <= iou <= 1 and 1 <= max_det <= 1000):
        raise RepositoryError("conf and iou must be in [0, 1] and max-det in 1..1000")
    name = name or model.stem
    if not name or "/" in name or name.startswith("."):
        raise RepositoryError(f"model name {name!r}: give a plain folder name")
    libs = [Path(p) for p in plugin_libs]
    for lib in libs:
        if not lib.is_file():
            raise RepositoryError(f"--plugin-lib {lib}: no such file")
    if not model.is_file():
        raise RepositoryError(f"{model}: no such file")
    created = not repo.exists()
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RepositoryError(f"cannot create the repository folder {repo}: {e}") from e
    staging = repo / f".attn-export-staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    ok = False
    try:
        result = _write(
            model, repo, staging, backend, name, max_batch, instances, kind, Params(conf, iou, max_det),
            max_queue_delay_us, threads, class_names, libs, force, verify, progress, head, dynamic_hw,
        )  # fmt: skip
        ok = True
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not ok:
            shutil.rmtree(repo, ignore_errors=True)  # it held only the staging folder


def _write(
    model, repo, staging, backend, name, max_batch, instances, kind, defaults, delay_us, threads, class_names, libs,
    force, verify, progress, head=None, dynamic_hw=None,
) -> Repository:  # fmt: skip
    net = load_network(model, staging, max_batch, class_names, verify, progress, dynamic_hw, head)
    if net.max_batch is not None and max_batch is not None and max_batch > net.max_batch:
        raise RepositoryError(
            f"--max-batch {max_batch} is above the model's batch profile (at most {net.max_batch}); use "
            f"--max-batch {net.max_batch} or rebuild with a larger --batch"
        )
    max_batch = max_batch or net.max_batch or DEFAULT_MAX_BATCH
    if backend == "tensorrt" and net.kind != "engine":
        raise RepositoryError(
            f"--backend tensorrt runs a built TensorRT engine; {model} is not one. Build it with "
            f"'attn-export {model.with_suffix('.pt')} --trt' on a GPU machine, or use --backend python|onnxruntime"
        )
    if backend == "onnxruntime" and net.kind == "engine":
        raise RepositoryError(f"--backend onnxruntime runs an ONNX graph; {model} is a TensorRT engine")
    if net.kind == "onnx" and net.custom_ops:
        raise RepositoryError(
            f"{model} has TensorRT plugin nodes (domains {', '.join(net.custom_ops)}), which onnxruntime cannot "
            "run: export it with --target ort (the default)"
        )
    if backend == "tensorrt" and net.plugin_mode == "jit":
        raise RepositoryError(
            f"{model} is a JIT-plugin engine: its plugins are Python code, which Triton's TensorRT backend cannot "
            "run. Rebuild it with AOT plugins (TensorRT >= 10.9), or serve it with --backend python"
        )
    instance_kind = "KIND_GPU" if kind == "gpu" or net.kind == "engine" else "KIND_CPU"
    extra = {"threads": threads} if threads else {}
    if backend == "python":
        configs = python_configs(name, net, max_batch, instances, instance_kind, defaults, delay_us, extra)
    else:
        configs = ensemble_configs(name, net, backend, max_batch, instances, instance_kind, defaults, delay_us, extra)
    clashes = [m for m in configs if (repo / m).exists()]
    if clashes and not force:
        raise RepositoryError(
            f"{repo} already holds {', '.join(clashes)}; pass --force to replace, or choose another --repo or --name"
        )
    from attn_export import __version__

    files: list[Path] = []
    for model_name, (config, cls) in configs.items():
        folder = staging / model_name
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(to_pbtxt(config))
        if cls is not None:
            what = {"Detector": "the whole detection contract", "Preprocess": "decode and letterbox",
                    "Postprocess": "NMS and the mapping back to image pixels"}[cls]  # fmt: skip
            (folder / "1" / "model.py").write_text(MODEL_PY.format(version=__version__, what=what, cls=cls))
        network_here = (backend == "python" and model_name == name) or model_name == f"{name}_network"
        if network_here:
            shutil.copyfile(net.path, folder / "1" / net.model_file)
    server_args: list[str] = []
    if libs:
        (staging / "plugins").mkdir()
        for lib in libs:
            shutil.copyfile(lib, staging / "plugins" / lib.name)
        joined = ";".join(f"plugins/{lib.name}" for lib in libs)
        server_args.append(f"--backend-config=tensorrt,plugins={joined}")
        (staging / ARGS_FILE).write_text(
            "# tritonserver flags this repository needs; plugin paths are relative to the repository\n"
            + "\n".join(server_args)
            + "\n"
        )
    # everything is written: move it into place
    for entry in sorted(staging.iterdir()):
        dest = repo / entry.name
        if entry.name == "plugins" and dest.is_dir():
            for lib in entry.iterdir():
                os.replace(lib, dest / lib.name)
            continue
        if dest.is_dir():
            old = staging / f".old-{entry.name}"
            os.replace(dest, old)
        os.replace(entry, dest)
    for model_name in configs:
        files.extend(sorted(p for p in (repo / model_name).rglob("*") if p.is_file()))
    notes = []
    if net.kind == "engine":
        notes.append("the engine runs only on the GPU model and TensorRT version it was built with")
    return Repository(repo, name, backend, max_batch, list(configs), files, server_args, notes)


# ------------------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export triton",
        description="Write a Triton Inference Server model repository for a detector (the EfficientNMS-style "
        "contract: image bytes in; num_detections, detection_boxes, detection_scores, detection_classes out). "
        "'attn-export triton serve DIR' runs tritonserver on it. See docs/triton.md.",
    )
    p.add_argument(
        "model", type=Path, help="an attn-export checkpoint (.pt, exported here), a .onnx graph or an engine"
    )
    p.add_argument(
        "--repo", type=Path, default=Path("model_repository"), help="repository folder (default ./model_repository)"
    )
    p.add_argument("--backend", choices=BACKENDS, default="python",
                   help="python: one Python-backend model (default); onnxruntime / tensorrt: the network on Triton's "
                   "native backend inside an ensemble with Python pre- and post-processing")  # fmt: skip
    p.add_argument("--name", help="model name (default: MODEL's stem)")
    p.add_argument(
        "--max-batch", type=int, help=f"max_batch_size (default: the engine's profile, else {DEFAULT_MAX_BATCH})"
    )
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count, default 1)")
    p.add_argument("--kind", choices=("cpu", "gpu"), default="cpu", help="instance kind (engines always gpu)")
    p.add_argument("--conf", type=float, default=0.25, help="default score threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=0.45, help="default NMS IoU (default 0.45)")
    p.add_argument("--max-det", type=int, default=100, help="output rows per image (default 100)")
    p.add_argument("--max-queue-delay-us", type=int, default=5000, help="dynamic batcher delay (default 5000)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads per instance (python backend)")
    p.add_argument("--class-names", help="comma-separated class names (default: from the model)")
    p.add_argument("--plugin-lib", action="append", default=[], type=Path,
                   help="a TensorRT plugin library to copy into the repository and load in tritonserver")  # fmt: skip
    p.add_argument("--head", choices=("contract", "yolov5", "yolov8"),
                   help="how the network's (first) output reads (default: from its shape and metadata)")  # fmt: skip
    p.add_argument("--dynamic-hw", metavar="MIN:OPT:MAX",
                   help="a checkpoint: export with free height and width over this range (rect letterbox)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace models of the same names in the repository")
    p.add_argument("--no-verify", action="store_true", help="skip the export's check against PyTorch (checkpoints)")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def _range(text: str | None) -> tuple[int, int, int] | None:
    if not text:
        return None
    try:
        lo, opt, hi = (int(t) for t in text.split(":"))
    except ValueError:
        raise RepositoryError(f"--dynamic-hw {text!r}: give MIN:OPT:MAX side lengths, e.g. 160:320:640") from None
    if not 0 < lo <= opt <= hi:
        raise RepositoryError(f"--dynamic-hw {text!r}: need 0 < MIN <= OPT <= MAX")
    return lo, opt, hi


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from attn_export.triton_server.launcher import main as serve_main

        return serve_main(argv[1:])
    args = parser().parse_args(argv)

    def progress(stage: str, message: str) -> None:
        if not args.quiet:
            print(f"[{stage}] {message}", file=sys.stderr)

    names = [t.strip() for t in args.class_names.split(",") if t.strip()] if args.class_names else None
    try:
        repo = write_repository(
            args.model, args.repo, backend=args.backend, name=args.name, max_batch=args.max_batch,
            instances=args.instances, kind=args.kind, conf=args.conf, iou=args.iou, max_det=args.max_det,
            max_queue_delay_us=args.max_queue_delay_us, threads=args.threads, class_names=names,
            plugin_libs=args.plugin_lib, force=args.force, verify=not args.no_verify, progress=progress,
            head=args.head, dynamic_hw=_range(args.dynamic_hw),
        )  # fmt: skip
    except RepositoryError as e:
        print(f"attn-export triton: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {repo.path}: {', '.join(repo.models)} ({repo.backend} backend, max_batch_size {repo.max_batch})")
    for f in repo.files:
        print(f"  {f}")
    for note in repo.notes:
        print(f"note: {note}")
    if repo.server_args:
        print(f"tritonserver flags (in {repo.path / ARGS_FILE}; triton serve adds them): {' '.join(repo.server_args)}")
    print(f"serve it: attn-export triton serve {repo.path}")
    return 0
