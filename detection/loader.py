"""From ``MODEL`` and ``--backend`` to a runner, the letterbox size and the class names.

=============  ======================  ==============================================================
backend        MODEL                   what runs
=============  ======================  ==============================================================
onnxruntime    ``.onnx``               the graph (CUDA provider first when onnxruntime-gpu has it)
onnxruntime    checkpoint (``.pt``)    exported once with :func:`~attn_export.export.export_onnx` to a
                                       cache file next to the checkpoint (or in a temp dir), verified
torch          checkpoint              the PyTorch model
tensorrt       engine (``.engine``)    :class:`~attn_export.runtime.trt_runner.TensorRTRunner`
=============  ======================  ==============================================================

Class names come from ``ATTN_EXPORT_CLASS_NAMES``, else the model's metadata: the ONNX graph's
``classes`` metadata property, the checkpoint's ``meta["classes"]`` (also a checkpoint of the same
name beside an ONNX graph), or the engine's metadata file; else ``class0``, ``class1``...
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from attn_export.detection.heads import DEFAULT_STRIDE, HeadError, choose_head, decode, describe_module
from attn_export.runtime.runners import OnnxRuntimeRunner, Runner, TorchRunner

log = logging.getLogger("attn_export.serve")

DEFAULT_INPUT_SIZE = 320
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

#: The shipped model, relative to the working directory (the Docker images put it at /opt/attn-export/models).
DEFAULT_MODEL_CANDIDATES = ("models/shapes_detector.onnx", "models/shapes_detector.pt")


def default_model() -> Path | None:
    """The shipped shapes detector when it is there (its ONNX graph first), else None."""
    for name in DEFAULT_MODEL_CANDIDATES:
        if Path(name).is_file():
            return Path(name)
    return None


class ModelOptions(Protocol):
    """What :func:`load` reads: the service's ``Settings`` has these fields, :class:`LoadOptions` too."""

    model: Path | None
    backend: str
    device: str
    cuda_graphs: bool
    threads: int | None
    ort_spinning: bool
    cache_dir: Path | None
    input_size: int | None
    class_names: list[str] | None
    max_batch: int | None
    # read with getattr (a caller's options may lack them): head ("contract", "yolov5", "yolov8"; None: from
    # the graph) and rect (None: the rectangular letterbox where the graph has free height and width)


@dataclass
class LoadOptions:
    """:class:`ModelOptions` for a caller without the service's settings (the load test, a script);
    the defaults are the service's."""

    model: Path | None
    backend: str = "onnxruntime"
    device: str = "auto"
    cuda_graphs: bool = True
    threads: int | None = None
    ort_spinning: bool = False
    cache_dir: Path | None = None
    input_size: int | None = None
    class_names: list[str] | None = None
    max_batch: int | None = None
    head: str | None = None
    rect: bool | None = None


class ModelError(RuntimeError):
    """The model cannot be served as asked; the message says why and what to do."""


@dataclass
class ServedModel:
    """A loaded model ready for :class:`~attn_export.serve.batching.Batcher`."""

    runner: Runner
    backend: str
    source: Path  # what was asked for
    path: Path  # what runs (the exported graph for a checkpoint on onnxruntime)
    input_name: str
    output_name: str
    input_size: int
    class_names: list[str] = field(default_factory=list)
    max_batch: int | None = None  # the engine's profile limit, where there is one
    notes: list[str] = field(default_factory=list)
    head: str = "contract"  # how the output reads (attn_export.detection.heads)
    stride: int = DEFAULT_STRIDE  # the network's largest stride
    rect: bool = False  # letterbox each image to its own rectangle of whole strides (free height and width)
    min_side: int = 0  # the rect letterbox's shortest side: the export's dynamic_hw minimum

    @property
    def name(self) -> str:
        return self.source.stem

    @property
    def provider(self) -> str:
        return self.runner.provider or self.runner.device

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The batch (B, 3, H, W) float32 through the network, its output read by the head: (B, N, 4 + C)."""
        out = decode(self.runner.infer({self.input_name: batch})[self.output_name], self.head)
        if out.ndim != 3 or out.shape[0] != batch.shape[0] or out.shape[2] < 5:
            raise RuntimeError(
                f"the model output has shape {tuple(out.shape)}; the service expects (batch, candidates, 4 + classes)"
            )
        return out

    def num_classes(self) -> int:
        """Classes the model scores (one dummy inference)."""
        x = np.zeros((1, 3, self.input_size, self.input_size), np.float32)
        return int(self.infer(x).shape[2] - 4)


def model_kind(path: Path) -> str:
    """``onnx``, ``engine`` or ``checkpoint`` from the suffix, else from the first bytes."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    if suffix in CHECKPOINT_SUFFIXES or zipfile.is_zipfile(path):
        return "checkpoint"
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80:
        return "checkpoint"
    return "onnx"  # onnx files have no magic number; onnxruntime says so if it is not one


# ------------------------------------------------------------------------------------------ metadata
def onnx_metadata(path: Path) -> dict[str, str]:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in model.metadata_props}
    except Exception:  # metadata is a nicety; onnxruntime reports a broken file
        return {}


def checkpoint_meta(path: Path) -> dict:
    """The ``meta`` dict of an attn-export checkpoint (weights-only load), or {}."""
    try:
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    if isinstance(obj, dict) and isinstance(obj.get("meta"), dict):
        meta = dict(obj["meta"])
        meta.setdefault("input_shape", obj.get("input_shape"))
        return meta
    return {}


def _names(value) -> list[str] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [t.strip() for t in value.split(",")]
    if isinstance(value, dict):  # {"0": "circle", ...}
        value = [value[k] for k in sorted(value, key=lambda k: int(k))]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _sibling_checkpoint(path: Path) -> Path | None:
    for suffix in CHECKPOINT_SUFFIXES:
        cand = path.with_suffix(suffix)
        if cand.is_file():
            return cand
    return None


# ------------------------------------------------------------------------------------------ export cache
def _digest(path: Path) -> str:
    from attn_export import __version__

    h = hashlib.sha256(f"attn-export {__version__}\n".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def cache_path(checkpoint: Path, cache_dir: Path | None = None) -> tuple[Path, list[Path]]:
    """Where a checkpoint's exported graph is cached, and every folder looked in for an existing one.

    The name holds a hash of the checkpoint's bytes and the attn-export version, so a changed checkpoint
    or a new release exports afresh.
    """
    name = f".{checkpoint.stem}.{_digest(checkpoint)}.onnx"
    folders = [cache_dir] if cache_dir else [checkpoint.resolve().parent, Path(tempfile.gettempdir()) / "attn-export"]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name, folders
    for folder in folders:
        if _writable(folder):
            return folder / name, folders
    raise ModelError(f"no writable folder to cache the exported graph of {checkpoint} in (tried {folders})")


def export_cached(checkpoint: Path, cache_dir: Path | None = None, max_batch: int = 8, progress=None) -> Path:
    """The ONNX graph of ``checkpoint``: from the cache, else exported, verified and cached."""
    from attn_export.export import ExportError, export_onnx, load_model

    target, _ = cache_path(checkpoint, cache_dir)
    if target.is_file():
        log.info("using the cached export %s of %s", target, checkpoint)
        return target
    log.info("exporting %s to %s (once; later starts reuse it)", checkpoint, target)
    try:
        loaded = load_model(checkpoint)
        if not loaded.input_shape:
            raise ModelError(f"{checkpoint}: the checkpoint holds no input shape; export it with attn-export first")
        meta = {**export_metadata(loaded.model, loaded.meta, loaded.input_shape), "source": checkpoint.name}
        result = export_onnx(
            loaded.model, target, loaded.input_shape, batch=(1, 1, max(2, max_batch)), progress=progress,
            metadata=meta,
        )  # fmt: skip
    except ExportError as e:
        raise ModelError(f"cannot export {checkpoint} to ONNX: {e}") from e
    if not result.ok:
        raise ModelError(f"the ONNX export of {checkpoint} failed verification against PyTorch; not serving it")
    return target


def export_metadata(model, meta: dict | None = None, input_shape=None) -> dict:
    """The ONNX metadata the service reads, from what the export knows: ``classes`` (the checkpoint's class
    names, else the model's ``names``), ``head`` and ``stride`` (a YOLO ``Detect`` inside), ``input_size``
    (the checkpoint's input side); see :func:`attn_export.detection.heads.describe_module`."""
    out = describe_module(model, meta)
    if input_shape and len(input_shape) == 3 and input_shape[1] == input_shape[2]:
        out["input_size"] = int(input_shape[-1])
    return out


def _stamp(path: Path, props: dict) -> None:
    """Add metadata properties to an ONNX file (atomically)."""
    import onnx

    model = onnx.load(str(path))
    for key, value in props.items():
        if value is None:
            continue
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ loading
def _tensorrt_problem() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (the Python package tensorrt; use the GPU Docker image)"
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def default_threads() -> int:
    """onnxruntime's intra-op threads: the CPUs this process may use, less one, which is left to the HTTP
    side (parsing, decoding, letterbox, NMS): when the model takes every core, those stall its parallel
    sections and the model's own throughput drops."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def _static_size(shape) -> int | None:
    if len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3] and shape[2] > 0:
        return int(shape[2])
    return None


def load(settings: ModelOptions, progress: Callable[[str, str], None] | None = None) -> ServedModel:
    """Load ``settings.model`` on ``settings.backend``; :class:`ModelError` with the reason on failure."""
    if settings.model is None:
        raise ModelError(
            "no model to serve: give MODEL (a .onnx graph, a TensorRT engine or a checkpoint), or set "
            "ATTN_EXPORT_MODEL; the shipped models/shapes_detector.onnx is not in the working directory"
        )
    source = Path(settings.model)
    if not source.exists():
        raise ModelError(f"{source}: no such file")
    if source.is_dir():
        raise ModelError(f"{source}: is a directory; give a .onnx graph, an engine or a checkpoint")
    kind = model_kind(source)
    backend = settings.backend
    meta: dict = {}
    size = settings.input_size
    notes: list[str] = []
    max_batch = None

    if backend == "tensorrt":
        problem = _tensorrt_problem()
        if problem:
            raise ModelError(f"--backend tensorrt is not available here: {problem}")
        if kind != "engine":
            raise ModelError(
                f"--backend tensorrt serves a built TensorRT engine (.engine); {source} is a {kind}. Build one with "
                f"'attn-export MODEL.pt --target trt --trt', or serve this file with --backend onnxruntime"
            )
        from attn_export.runtime.trt_runner import TensorRTRunner

        try:
            runner: Runner = TensorRTRunner(source)
        except Exception as e:
            raise ModelError(f"cannot load the TensorRT engine {source}: {e}") from e
        meta = dict(getattr(runner, "metadata", None) or {})
        max_batch = (meta.get("batch") or {}).get("max")
        shape = (meta.get("inputs") or [{}])[0].get("shape") or []
        size = size or (_static_size([None, *shape[1:]]) if shape else None)
        path = source
    elif backend == "torch":
        if kind != "checkpoint":
            raise ModelError(f"--backend torch serves a checkpoint (.pt); {source} is a {kind}")
        import torch

        from attn_export.export import ExportError, load_model

        try:
            loaded = load_model(source)
        except ExportError as e:
            raise ModelError(str(e)) from e
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        meta = dict(loaded.meta)
        shape = loaded.input_shape or ()
        size = size or (_static_size((None, *shape)) if shape else None)
        runner = TorchRunner(
            loaded.model,
            input_names=("input",),
            output_names=("output",),
            device=device,
            prepare=True,  # BatchNorm folded (runtime/precision.py), the same step as the ONNX export
            cuda_graphs=settings.cuda_graphs,
            max_batch=settings.max_batch or 16,  # the batcher's default on a GPU
            input_shape=(shape[0], size, size) if shape and size else None,  # what the letterbox makes
        )
        for note in runner.notes:
            log.warning("%s", note)
            notes.append(note)
        max_batch = runner.max_batch  # the largest captured graph, so the batcher never pads past it
        path = source
    else:  # onnxruntime
        if kind == "engine":
            raise ModelError(f"{source} is a TensorRT engine: serve it with --backend tensorrt")
        if kind == "checkpoint":
            path = export_cached(source, settings.cache_dir, settings.max_batch or 8, progress)
            notes.append(f"exported from {source.name} to {path}")
        else:
            path = source
        try:
            spin = {"session.intra_op.allow_spinning": "1" if settings.ort_spinning else "0"}
            runner = OnnxRuntimeRunner(path, threads=settings.threads or default_threads(), session_config=spin)
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load {path}: {e}") from e
        props = onnx_metadata(path)
        meta = dict(props)
        if "classes" not in meta:
            sibling = source if kind == "checkpoint" else _sibling_checkpoint(source)
            if sibling is not None:
                meta.update({k: v for k, v in checkpoint_meta(sibling).items() if k == "classes"})
        shape = runner.session.get_inputs()[0].shape
        size = size or _static_size(shape)
        free_hw = len(shape) == 4 and not any(isinstance(d, int) and d > 0 for d in shape[2:])
        out_shape = runner.session.get_outputs()[0].shape
    if backend != "onnxruntime":
        free_hw, out_shape = False, None

    if len(runner.input_names) != 1:
        raise ModelError(f"{source}: the service runs models with one image input; this one has {runner.input_names}")
    rect = getattr(settings, "rect", None)
    if rect and not free_hw:
        raise ModelError(
            f"{source}: rectangular inference needs an ONNX graph with free height and width (export it with "
            "--dynamic-hw MIN:OPT:MAX); this one is served square"
        )
    try:
        stride = int(meta.get("stride") or DEFAULT_STRIDE)
    except (TypeError, ValueError):
        stride = DEFAULT_STRIDE
    hw = meta.get("dynamic_hw")
    try:
        min_side = int((json.loads(hw) if isinstance(hw, str) else hw or {}).get("min") or 0)
    except (TypeError, ValueError, AttributeError):
        min_side = 0
    served = ServedModel(
        runner=runner,
        backend=backend,
        source=source,
        path=path,
        input_name=runner.input_names[0],
        output_name=runner.output_names[0] if runner.output_names else "output",
        input_size=int(size or meta.get("input_size") or DEFAULT_INPUT_SIZE),
        max_batch=int(max_batch) if max_batch else None,
        notes=notes,
        stride=max(1, stride),
        rect=bool(free_hw if rect is None else rect),
        min_side=max(0, min_side),
    )
    if served.rect and served.input_size % served.stride:
        raise ModelError(
            f"{source}: the letterbox size {served.input_size} is not a multiple of the model's stride "
            f"{served.stride}; pass --input-size {(served.input_size // served.stride + 1) * served.stride}"
        )
    try:
        if out_shape is None or not any(isinstance(d, int) for d in list(out_shape)[1:]):  # a test inference's
            x = np.zeros((1, 3, served.input_size, served.input_size), np.float32)
            out_shape = runner.infer({served.input_name: x})[served.output_name].shape
        served.head = choose_head(out_shape, meta, getattr(settings, "head", None))
    except HeadError as e:
        raise ModelError(f"{source}: {e}") from e
    except Exception as e:
        raise ModelError(f"{source}: a test inference at {served.input_size}x{served.input_size} failed: {e}") from e
    try:
        classes = served.num_classes()
    except Exception as e:
        raise ModelError(f"{source}: a test inference at {served.input_size}x{served.input_size} failed: {e}") from e
    names = settings.class_names or _names(meta.get("classes")) or _names(meta.get("names")) or []
    if len(names) < classes:
        names = names + [f"class{i}" for i in range(len(names), classes)]
    served.class_names = names[:classes]
    return served
