"""Export a model to ONNX: adapt, export with a dynamic batch, clean up, verify, write atomically."""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import logging
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attn_export.export.adapt import AdaptRecord, adapt, function_rewrites
from attn_export.export.errors import ExportError
from attn_export.export.verify import VerifyReport, compare_outputs
from attn_export.runtime.precision import prepare_for_inference

log = logging.getLogger("attn_export")

INPUT_NAME = "input"
MIN_OPSET = 18
#: Verification caps the batch so that one input holds at most this many elements.
VERIFY_MAX_ELEMENTS = 1 << 24
#: Target ``trt`` is verified on ``onnx.reference`` (pure numpy, slow): its batches are capped here.
TRT_VERIFY_MAX_BATCH = 8
#: The verification backend of each target (the report's ``backend``).
VERIFY_BACKENDS = {
    "ort": "onnxruntime CPUExecutionProvider",
    "trt": "onnx.reference.ReferenceEvaluator with the numpy plugin references",
}


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced."""

    path: Path | None
    target: str
    input_name: str
    input_shape: tuple[int, ...]
    output_names: list[str]
    batch: tuple[int, int, int]
    opset: int
    nodes: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    plugins: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    adapted: list[AdaptRecord] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    report: VerifyReport | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.path is not None and (self.report is None or self.report.passed)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path) if self.path else None,
            "target": self.target,
            "input": {"name": self.input_name, "shape": ["batch", *self.input_shape]},
            "outputs": self.output_names,
            "batch": {"min": self.batch[0], "opt": self.batch[1], "max": self.batch[2]},
            "opset": self.opset,
            "nodes": self.nodes,
            "ops": self.ops,
            "plugins": self.plugins,
            "size_bytes": self.size_bytes,
            "adapted": [vars(r) for r in self.adapted],
            "blocks": self.blocks,
            "timings_s": self.timings,
            "verification": self.report.to_dict() if self.report else None,
        }


class _Stage:
    """Times a pipeline stage and reports it through ``progress`` (the CLI prints these)."""

    def __init__(self, timings: dict[str, float], progress: Callable[[str, str], None] | None) -> None:
        self.timings = timings
        self.progress = progress or (lambda stage, msg: log.info("%s: %s", stage, msg))

    @contextlib.contextmanager
    def __call__(self, name: str):
        """Time stage ``name``; anything unexpected in it becomes a one-line :class:`ExportError` naming it."""
        t0 = time.perf_counter()
        try:
            yield
        except ExportError:
            raise
        except Exception as e:
            log.debug("%s: unexpected error", name, exc_info=True)
            raise ExportError(f"{name}: unexpected {_first_line(e)} (rerun with -v for the traceback)") from e
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def say(self, stage: str, msg: str) -> None:
        self.progress(stage, msg)


def parse_batch(text: str | Sequence[int]) -> tuple[int, int, int]:
    """``"1:4:32"`` (or ``"8"``) -> ``(1, 4, 32)`` with ``1 <= min <= opt <= max``."""
    if isinstance(text, str):
        parts = text.split(":")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            vals = []
    else:
        vals = [int(v) for v in text]
    if len(vals) == 1:
        vals = [1, vals[0], vals[0]]
    if len(vals) != 3 or not (1 <= vals[0] <= vals[1] <= vals[2]):
        raise ExportError(f"--batch: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return vals[0], vals[1], vals[2]


def block_types() -> tuple[type[nn.Module], ...]:
    from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv

    return (Involution2d, ODConv2d, OutlookAttention, GSoPBlock, SKConv)


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost attn-export blocks in ``model`` (the model itself is ``""``)."""
    kinds = block_types()
    found: list[str] = []
    for path, mod in model.named_modules():
        if isinstance(mod, kinds) and not any(path.startswith(p + ".") or p == "" for p in found):
            found.append(path)
    return found


class _Probe(nn.Module):
    """Returns the model's outputs followed by the outputs of the probed blocks, in call order."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self._store: list[torch.Tensor] = []
        mods = dict(model.named_modules())
        self._handles = [mods[p].register_forward_hook(self._hook) for p in paths]

    def _hook(self, module, args, output):
        if isinstance(output, torch.Tensor):
            self._store.append(output)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def forward(self, x):
        self._store.clear()
        out = self.model(x)
        probes = tuple(self._store)
        self._store.clear()
        return (*torch.utils._pytree.tree_leaves(out), *probes)


def _dynamic_shapes(args: Sequence, batch: int, max_batch: int | None):
    dim = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    return tuple({0: dim} if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else None for a in args)


@contextlib.contextmanager
def capture_output() -> Iterator[list[str]]:
    """Take what is printed meanwhile, by Python or by C++ (file descriptors 1 and 2 as well as
    ``sys.stdout``/``sys.stderr``), off the terminal into a temporary file; on exit the yielded list
    holds it as one string. Shared by the export (torch's FX dumps) and the benchmark (the exporters'
    noise)."""
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        text = io.StringIO()
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace") + text.getvalue())


@contextlib.contextmanager
def _captured_output(what: str):
    """Send what torch prints while exporting (FX graph dumps on failures: dozens of lines, often twice)
    to the debug log (the CLI shows it with -v) instead of the terminal."""
    captured: list[str] = []
    try:
        with capture_output() as captured:
            yield
    finally:
        dumped = "".join(captured)
        if dumped.strip() and log.isEnabledFor(logging.DEBUG):
            log.debug("%s: what torch printed:\n%s", what, dumped.rstrip())


def _torch_onnx_export(module: nn.Module, args: tuple, table: dict, opset: int, output_names: list[str] | None):
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notes: we do not use torchvision
    batch = args[0].shape[0]
    dynamic = _dynamic_shapes(args, batch, None)
    try:
        with warnings.catch_warnings(), _captured_output(f"torch.onnx.export of {type(module).__name__}"):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=[INPUT_NAME] if len(args) == 1 else None,
                output_names=output_names,
                opset_version=opset,
                dynamic_shapes=dynamic,
                custom_translation_table=table,
                optimize=True,
                verbose=False,
                report=False,
            )
    finally:
        quiet.setLevel(level)
    proto = prog.model_proto
    # torch.export may specialise the batch silently (e.g. x.view(4, ...)); the graph's input then has a
    # fixed batch, which renaming the axis "batch" later would hide.
    for spec, value in zip(dynamic, proto.graph.input, strict=False):
        dims = value.type.tensor_type.shape.dim
        if spec and dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"the batch dimension was fixed to {dims[0].dim_value} while tracing: the model computes with a "
                "constant batch size (e.g. x.view(4, ...)); use x.shape[0] or -1 for the batch instead"
            )
    return proto


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    """A one-line reason: the exporter's "Exception summary" when it has one, else the first line."""
    text = [t.strip() for t in _ANSI.sub("", str(e)).splitlines()]
    text = [t for t in text if t]
    if "## Exception summary" in text:
        after = text[text.index("## Exception summary") + 1 :]
        if after:
            return after[0][:400]
    msg = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {msg[:400]}"


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "data dependent")
_RAISED_AT = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')


def _library_file(filename: str) -> bool:
    """Frames that are not the user's: torch, onnx, onnxscript, the standard library, this package's
    export machinery, generated code."""
    if filename.startswith("<"):
        return True
    import onnx
    import onnxscript

    dirs = [os.path.dirname(os.path.abspath(m.__file__)) for m in (torch, onnx, onnxscript)]
    dirs.append(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(filename)
    stdlib = os.path.dirname(os.path.abspath(contextlib.__file__))
    in_stdlib = path.startswith(stdlib + os.sep) and not any(p in path for p in ("site-packages", "dist-packages"))
    return in_stdlib or any(path.startswith(d + os.sep) for d in dirs)


def user_frame(e: BaseException) -> tuple[str, int, str, str, object] | None:
    """The innermost frame of the user's code in ``e``'s chain: ``(file, line, function, source, self)``,
    where ``self`` is the frame's ``self`` (the module whose method it is) or None."""
    import linecache
    import traceback

    found = None
    seen: set[int] = set()
    chain = [e]
    while chain and len(seen) < 20:
        c = chain.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        for frame, lineno in traceback.walk_tb(c.__traceback__):
            code = frame.f_code
            if not _library_file(code.co_filename):
                found = (code.co_filename, lineno, code.co_name, "", frame.f_locals.get("self"))
        if found is None:  # torch.export names the call in its message
            m = _RAISED_AT.search(_ANSI.sub("", str(c)))
            if m:
                found = (m.group(1), int(m.group(2)), m.group(3), m.group(4).strip(), None)
        chain += [x for x in (c.__cause__, c.__context__) if x is not None]
    if found and not found[3]:
        found = (*found[:3], linecache.getline(found[0], found[1]).strip(), found[4])
    return found


def _is_data_dependent(e: BaseException) -> bool:
    c: BaseException | None = e
    for _ in range(20):
        if c is None:
            return False
        if any(k in type(c).__name__ or k in str(c)[:2000] for k in _DATA_DEPENDENT):
            return True
        c = c.__cause__ or c.__context__
    return False


def explain_export_failure(e: BaseException, model: nn.Module | None = None) -> str | None:
    """A one-line explanation of a failure whose cause is in the user's code, or None: the file, line
    and source of the user's frame, and the module it belongs to when it is one of ``model``'s."""
    where = user_frame(e)
    if not where:
        return None
    file, line, func, code, owner = where
    at = f"{file}:{line} in {func}: `{code}`" if code else f"{file}:{line} in {func}"
    paths = {id(m): p for p, m in model.named_modules()} if model is not None else {}
    if id(owner) in paths:
        path = paths[id(owner)]
        at = f"module '{path or '<model>'}' ({type(owner).__name__}) at {at}"
    if _is_data_dependent(e):
        return (
            f"export failed in {at}: the model branches on a tensor's value (data-dependent control flow), "
            "which a graph cannot hold; compute both sides and select with torch.where, use torch.cond, "
            "or move the decision out of the model"
        )
    return f"export failed in {at}: {_first_line(e)}"


def locate_failure(model: nn.Module, sample: torch.Tensor, table: dict, opset: int) -> tuple[str, str] | None:
    """Find the smallest submodule that fails to export on its own: ``(path, reason)``."""
    paths = [p for p, _ in model.named_modules() if p]
    seen: dict[str, tuple] = {}
    mods = dict(model.named_modules())
    handles = [mods[p].register_forward_pre_hook(lambda m, a, p=p: seen.setdefault(p, a)) for p in paths]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()

    def fails(path: str) -> str | None:
        args = seen.get(path)
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            return None
        try:
            _torch_onnx_export(mods[path], tuple(args), table, opset, None)
        except Exception as e:
            return _first_line(e)
        return None

    culprit: tuple[str, str] | None = None
    parent = ""
    while True:
        children = [f"{parent}.{n}" if parent else n for n, _ in mods[parent].named_children()]
        for child in children:
            reason = fails(child)
            if reason:
                culprit = (child, reason)
                parent = child
                break
        else:
            return culprit


def _surgery(proto, output_names: list[str], keep: int, target: str = "ort"):
    """Keep the first ``keep`` outputs, fold constants, drop dead nodes, sort, name the batch axis.

    The same checks for both targets: strict ONNX shape inference and the full checker. The plugin
    nodes of target ``trt`` are in a domain ONNX has no schemas for, so both pass over them; their
    output types and shapes are the exporter's ``value_info`` (from the ops' fake kernels), which
    :func:`_check_plugin_nodes` requires to be there.
    """
    import onnx
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # fold_constants runs onnxruntime; its notes are noise here
    graph = gs.import_onnx(proto)
    graph.outputs = graph.outputs[:keep]
    for t, name in zip(graph.outputs, output_names, strict=True):
        t.name = name
    graph.fold_constants().cleanup(remove_unused_graph_inputs=False).toposort()
    for t in [*graph.inputs, *graph.outputs]:
        if t.shape:
            t.shape = ["batch", *t.shape[1:]]
    model = gs.export_onnx(graph)
    del model.opset_import[:]
    model.opset_import.extend(proto.opset_import)
    model.ir_version = min(proto.ir_version, 10)  # onnxruntime reads IR <= 10 everywhere we ship
    model.producer_name = "attn-export"
    from attn_export import __version__

    model.producer_version = __version__
    if target == "trt":
        _order_plugin_attributes(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    if target == "trt":
        _check_plugin_nodes(model)
    return model


def _order_plugin_attributes(model) -> None:
    """Put each plugin node's attributes in the plugin's order (the exporter records them in its own)."""
    from attn_export.plugins._plugin_node import attribute_order
    from attn_export.plugins._trt_names import DOMAIN, PLUGINS

    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in PLUGINS.values():
            rank = {name: i for i, name in enumerate(attribute_order(node.op_type))}
            attrs = [type(a).FromString(a.SerializeToString()) for a in node.attribute]  # copies, then reorder
            attrs.sort(key=lambda a: (rank.get(a.name, len(rank)), a.name))
            del node.attribute[:]
            node.attribute.extend(attrs)


def _check_plugin_nodes(model) -> dict[str, int]:
    """``{plugin name: count}`` of a ``trt`` graph, after checking each plugin node's convention.

    A plugin node has ``op_type`` = a plugin name, domain ``DOMAIN``, ``plugin_namespace`` and
    ``plugin_version`` attributes, and outputs of known element type and rank; no other domain appears.
    """
    from onnx import helper

    from attn_export.plugins._trt_names import DOMAIN, NAMESPACE, PLUGINS, VERSION

    typed = {
        v.name: v.type.tensor_type
        for v in [*model.graph.value_info, *model.graph.output]
        if v.type.tensor_type.elem_type and v.type.tensor_type.HasField("shape")
    }
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            continue
        where = f"node {node.name or node.output[0]!r} ({node.domain}::{node.op_type})"
        if node.domain != DOMAIN or node.op_type not in PLUGINS.values():
            raise ExportError(f"target trt: {where} is neither standard ONNX nor an attn-export plugin node")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("plugin_namespace") != NAMESPACE.encode() or attrs.get("plugin_version") != VERSION.encode():
            raise ExportError(f"target trt: {where} lacks plugin_namespace={NAMESPACE!r}, plugin_version={VERSION!r}")
        untyped = [o for o in node.output if o not in typed]
        if untyped:
            raise ExportError(f"target trt: the exporter gave no type and shape for {untyped} of {where}")
        counts[node.op_type] += 1
    return dict(counts)


def _verify_batches(batch: tuple[int, int, int], input_shape: Sequence[int], target: str = "ort") -> list[int]:
    """MIN, OPT and MAX, each capped (by input size; for ``trt`` also at :data:`TRT_VERIFY_MAX_BATCH`)."""
    cap = max(1, VERIFY_MAX_ELEMENTS // max(1, math.prod(input_shape)))
    if target == "trt":
        cap = min(cap, TRT_VERIFY_MAX_BATCH)
    return sorted({min(b, cap) for b in batch})


def _runner_factory(target: str) -> Callable:
    """``ModelProto -> Runner`` for the target's verification backend."""
    from attn_export.runtime.runners import OnnxRuntimeRunner, ReferenceRunner

    if target == "trt":
        from attn_export.plugins import reference_ops

        ops = reference_ops()
        return lambda proto: ReferenceRunner(proto, new_ops=ops)
    return lambda proto: OnnxRuntimeRunner(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def verify_onnx(
    model: nn.Module,
    shipped,
    probe,
    input_shape: Sequence[int],
    batches: Sequence[int],
    output_names: list[str],
    block_paths: list[str],
    atol: float,
    rtol: float,
    seed: int | None = None,
    target: str = "ort",
    runner_factory: Callable | None = None,
    backend: str | None = None,
) -> VerifyReport:
    """Run PyTorch and the target's ONNX backend on the same fresh random inputs; compare outputs and blocks.

    The backend (:data:`VERIFY_BACKENDS`): onnxruntime on CPU for ``ort``; for ``trt``, ONNX's
    reference evaluator with the numpy implementations of the plugin nodes (TensorRT itself is not
    needed, so the plugin graph is checked on any machine). ``runner_factory`` (``ModelProto -> Runner``,
    see :mod:`attn_export.runtime.runners`) and ``backend`` (its name in the report) replace that choice.
    """
    from attn_export.runtime.runners import TorchRunner

    make_runner = runner_factory or _runner_factory(target)
    backend = backend or (VERIFY_BACKENDS[target] if runner_factory is None else "custom runner")
    seed = secrets.randbits(31) if seed is None else seed
    rng = np.random.default_rng(seed)
    final_runner = make_runner(shipped)
    probe_runner = make_runner(probe) if block_paths else None
    probe_mod = _Probe(model, block_paths)
    try:
        report = VerifyReport(backend, seed, list(batches))
        torch_runner = TorchRunner(probe_mod, [INPUT_NAME])
        n = len(output_names)
        for b in batches:
            x = rng.standard_normal((b, *input_shape), dtype=np.float32)
            try:
                ref = torch_runner.infer({INPUT_NAME: x})
            except Exception as e:
                raise ExportError(
                    f"verification: the PyTorch model fails on a batch of {b} ({_first_line(e)}); the model "
                    "must run at every batch size the ONNX graph accepts"
                ) from e
            ref_list = list(ref.values())
            ref_final = dict(zip(output_names, ref_list[:n], strict=True))
            try:
                got_final = final_runner.infer({INPUT_NAME: x})
                got_all = probe_runner.infer({INPUT_NAME: x}) if probe_runner is not None else {}
            except Exception as e:
                raise ExportError(
                    f"verification: {backend} cannot run the exported graph on a batch of {b} ({_first_line(e)})"
                ) from e
            report.outputs += compare_outputs(ref_final, got_final, b, atol, rtol)
            if probe_runner is not None:
                got = list(got_all.values())[n:]
                labels = _block_labels(block_paths, len(ref_list) - n)
                refs = dict(zip(labels, ref_list[n:], strict=True))
                report.blocks += compare_outputs(refs, dict(zip(labels, got, strict=False)), b, atol, rtol)
    finally:
        probe_mod.remove()
    return report


def _block_labels(paths: list[str], count: int) -> list[str]:
    if count == len(paths):
        return list(paths)
    return [f"block[{i}]" for i in range(count)]  # a block called more than once: label by call order


def _write_atomically(proto, path: Path) -> int:
    import onnx

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    input_shape: Sequence[int],
    batch: tuple[int, int, int] | str = (1, 1, 32),
    opset: int = MIN_OPSET,
    target: str = "ort",
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int | None = None,
    progress: Callable[[str, str], None] | None = None,
    metadata: dict | None = None,
    copy_model: bool = True,
) -> ExportResult:
    """Export ``model`` to ONNX at ``output`` with a dynamic batch axis, then verify it.

    ``target="ort"`` lowers the attn-export ops into standard ONNX ops, verified on onnxruntime;
    ``target="trt"`` writes each op call as one TensorRT plugin node (everything else standard ONNX),
    verified on ``onnx.reference`` with the numpy plugin references, at batches capped at
    :data:`TRT_VERIFY_MAX_BATCH` (the reference evaluator is slow).

    The file appears only when the export and the verification succeed (a temporary file in the same
    folder is renamed into place). A graph that fails verification is kept beside it as
    ``<name>.unverified.onnx`` for inspection, and the result's ``ok`` is False. ``metadata`` entries
    are written as the graph's metadata properties (non-strings as JSON).

    ``model`` is left as it is: the export works on a deep copy (switched to eval mode and float32,
    its foreign blocks swapped for attn-export's). ``copy_model=False`` saves the copy for a model
    that is not used afterwards (or that cannot be copied): that model is then changed in place, and
    when the model itself is a foreign block, the replacement is only in the result's graph.
    Problems raise :class:`ExportError` with a one-line message that names the stage.
    """
    from attn_export.plugins import TARGETS, onnx_translation_table

    if target not in TARGETS:
        raise ExportError(f"--target: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if opset < MIN_OPSET:
        raise ExportError(f"--opset: the exporter needs opset {MIN_OPSET} or newer, got {opset}")
    batch = parse_batch(batch) if isinstance(batch, str) else tuple(batch)
    input_shape = tuple(int(d) for d in input_shape)
    output = Path(output)
    if output.exists() and output.is_dir():
        raise ExportError(f"{output}: is a directory; give a file path for the ONNX model")
    if not output.parent.exists():
        raise ExportError(f"{output.parent}: the output folder does not exist")
    result = ExportResult(None, target, INPUT_NAME, input_shape, [], batch, opset)
    stage = _Stage(result.timings, progress)
    with stage("prepare"):
        if copy_model:
            try:
                model = copy.deepcopy(model)
            except Exception as e:
                raise ExportError(
                    f"prepare: the model cannot be deep-copied ({_first_line(e)}); export_onnx works on a copy so "
                    "that your model stays as it is: pass copy_model=False to export it in place"
                ) from e
        # Never chain on what train()/eval() return: mmcv/mmdet-style backbones override train()
        # without returning self.
        model.eval()
        model.float()
        trace_batch = max(2, batch[1])  # 0/1 are specialised by torch.export; trace with a batch of 2 or more
        sample = torch.randn((trace_batch, *input_shape), generator=torch.Generator().manual_seed(0))

    with stage("adapt"):
        try:
            with torch.no_grad():
                first = model(sample)
        except Exception as e:
            raise ExportError(
                f"the model does not run on an input of shape {tuple(sample.shape)}: {_first_line(e)}"
            ) from e
        model, result.adapted = adapt(model, sample)
        # BatchNorm folded into the convs (half precision starts from it); in place: the model is the
        # export's own copy, or the caller asked for an in-place export (copy_model=False)
        model = prepare_for_inference(model, inplace=True)
        result.blocks = find_blocks(model)
        n_out = len(torch.utils._pytree.tree_leaves(first))
        result.output_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    for r in result.adapted:
        stage.say("adapt", f"{r.path or '<model>'}: {r.foreign} {r.action} {r.reason}".rstrip())
    stage.say("adapt", f"{len(result.blocks)} attn-export block(s): {', '.join(result.blocks) or 'none'}")

    table = onnx_translation_table(target)
    with stage("export"), function_rewrites():
        probe = _Probe(model, result.blocks)
        try:
            names = result.output_names + [f"block:{p}" for p in result.blocks]
            proto = _torch_onnx_export(probe, (sample,), table, opset, None)
        except Exception as e:
            probe.remove()
            if _is_data_dependent(e):
                explained = explain_export_failure(e, model)
                if explained:
                    raise ExportError(explained) from e
            try:
                where = locate_failure(model, sample, table, opset)
            except Exception:  # the search is a courtesy; the first failure is what matters
                where = None
            at = user_frame(e)
            loc = (f" at {at[0]}:{at[1]}" + (f" (`{at[3]}`)" if at[3] else "")) if at else ""
            if where:
                path, reason = where
                kind = type(model.get_submodule(path)).__name__
                raise ExportError(f"export failed in module '{path}' ({kind}){loc}: {reason}") from e
            raise ExportError(f"export failed{loc}: {_first_line(e)}") from e
        probe.remove()
    stage.say("export", f"torch.onnx (dynamo) opset {opset}, target {target}, {len(proto.graph.node)} nodes")

    with stage("surgery"):
        shipped = _surgery(proto, result.output_names, n_out, target)
        n_probe = len(proto.graph.output)
        probe_graph = _surgery(proto, names[:n_probe], n_probe, target) if result.blocks else None
    result.nodes = len(shipped.graph.node)
    result.ops = dict(collections.Counter(n.op_type for n in shipped.graph.node).most_common())
    stage.say("surgery", f"{result.nodes} nodes, ops: {', '.join(result.ops)}")
    if target == "trt":
        result.plugins = _check_plugin_nodes(shipped)
        listed = ", ".join(f"{k} x{v}" for k, v in result.plugins.items()) or "none (no attn-export op in the model)"
        stage.say("surgery", f"TensorRT plugin nodes: {listed}")

    if verify:
        with stage("verify"):
            batches = _verify_batches(batch, input_shape, target)
            result.report = verify_onnx(
                model,
                shipped,
                probe_graph,
                input_shape,
                batches,
                result.output_names,
                result.blocks,
                atol,
                rtol,
                seed,
                target=target,
            )
        capped = " (capped: the reference evaluator is slow)" if target == "trt" and max(batches) < batch[2] else ""
        verdict = "passed" if result.report.passed else "FAILED"
        stage.say("verify", f"batches {batches}{capped} on {result.report.backend}: {verdict}")

    if result.report is not None and not result.report.passed:
        kept = output.with_name(output.stem + ".unverified.onnx")
        with stage("write"):
            _write_atomically(shipped, kept)
        stage.say("write", f"verification failed; the graph is kept at {kept} for inspection, not at {output}")
        return result
    with stage("write"):
        for key, value in (metadata or {}).items():  # e.g. the checkpoint's class names, for the service
            if value is not None:
                entry = shipped.metadata_props.add()
                entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
        result.size_bytes = _write_atomically(shipped, output)
    result.path = output
    return result
