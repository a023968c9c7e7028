"""The export pipeline: prepare, adapt, export with a dynamic batch, clean up, verify, write atomically.

Each stage is timed and named in the errors: the torch export is :mod:`attn_export.export.torch_export`,
the graph surgery :mod:`attn_export.export.surgery`, the comparison with PyTorch
:mod:`attn_export.export.compare`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attn_export.export.adapt import AdaptRecord, adapt, function_rewrites
from attn_export.export.compare import VerifyReport, compare_runners
from attn_export.export.errors import ExportError, SizeRefused, first_line
from attn_export.export.inputs import (
    check_forward,
    check_inputs,
    describe_inputs,
    order_inputs,
    plan_sizes,
    sample_inputs,
    shapes_at,
)
from attn_export.export.profile import parse_batch, parse_hw, rounded_hw
from attn_export.export.surgery import check_plugin_nodes, clean_graph
from attn_export.export.torch_export import (
    INPUT_NAME,
    Probe,
    Splat,
    export_failure,
    find_blocks,
    torch_onnx_export,
)
from attn_export.files import write_bytes
from attn_export.runtime.precision import prepare_for_inference

log = logging.getLogger("attn_export")

MIN_OPSET = 18
#: Verification caps the batch so that one input holds at most this many elements.
VERIFY_MAX_ELEMENTS = 1 << 24
#: Target ``trt`` is verified on ``onnx.reference`` (pure numpy, slow): its batches are capped here.
TRT_VERIFY_MAX_BATCH = 8
#: The verification backend of each target (the report's ``backend``).
VERIFY_BACKENDS = {
    "ort": "onnxruntime CPUExecutionProvider",
    "trt": "onnxruntime CPUExecutionProvider with the numpy plugin references as custom ops "
    "(cross-checked on onnx.reference.ReferenceEvaluator at batch 1)",
}
#: How target ``trt`` runs its plugin graph: ``"onnxruntime"`` (each plugin node by its numpy reference as an
#: onnxruntime-extensions Python op; the first batch's first item also on ONNX's reference evaluator, which
#: must agree) or ``"reference"`` (the whole graph on ONNX's reference evaluator: slow, numpy throughout).
TRT_VERIFY_RUNNER = "onnxruntime"


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
    #: ``{"name", "shape"}`` of each graph input (the batch and, with dynamic_hw, height/width by name)
    inputs: list[dict] = field(default_factory=list)
    #: ``(min, opt, max)`` of the image sides where the graph's height and width are symbolic, else None
    dynamic_hw: tuple[int, int, int] | None = None
    #: why height and width stayed static although ``dynamic_hw`` was asked for (one line), else ""
    hw_refused: str = ""
    #: the graph's height and width must be multiples of this (the model's largest stride, where it needs one)
    hw_multiple: int = 1
    #: ``{"given": "train"|"eval", "exported": "eval", "note": ...}``
    mode: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.path is not None and (self.report is None or self.report.passed)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path) if self.path else None,
            "target": self.target,
            "input": {"name": self.input_name, "shape": self._graph_shape(self.input_name, self.input_shape)},
            "inputs": [{"name": i["name"], "shape": self._graph_shape(i["name"], i["shape"][1:])} for i in self.inputs],
            "dynamic_hw": (
                {**dict(zip(("min", "opt", "max"), self.dynamic_hw, strict=True)), "multiple_of": self.hw_multiple}
                if self.dynamic_hw
                else None
            ),
            "dynamic_hw_refused": self.hw_refused or None,
            "mode": self.mode,
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

    def _graph_shape(self, name: str, shape: Sequence[int]) -> list:
        """The graph's shape of input ``name``: ``batch`` first, ``height``/``width`` where they are symbolic."""
        dims: list = ["batch", *shape]
        dynamic = self.dynamic_hw and len(shape) == 3 and tuple(shape[1:]) == tuple(self.input_shape[1:])
        return [*dims[:2], "height", "width"] if dynamic else dims


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
            raise ExportError(f"{name}: unexpected {first_line(e)} (rerun with -v for the traceback)") from e
        self.timings[name] = round(time.perf_counter() - t0, 3)

    def say(self, stage: str, msg: str) -> None:
        self.progress(stage, msg)


def _verify_batches(batch: tuple[int, int, int], input_shape: Sequence[int], target: str = "ort") -> list[int]:
    """MIN, OPT and MAX, each capped (by input size; for ``trt`` also at :data:`TRT_VERIFY_MAX_BATCH`)."""
    cap = max(1, VERIFY_MAX_ELEMENTS // max(1, math.prod(input_shape)))
    if target == "trt":
        cap = min(cap, TRT_VERIFY_MAX_BATCH)
    return sorted({min(b, cap) for b in batch})


def _runner_factory(target: str) -> Callable:
    """``ModelProto -> Runner`` for the target's verification backend."""
    import importlib.util

    from attn_export.runtime.runners import OnnxRuntimeRunner, ReferenceRunner

    runner = TRT_VERIFY_RUNNER
    if target == "trt" and runner != "reference" and importlib.util.find_spec("onnxruntime_extensions") is None:
        log.warning(
            "verify: onnxruntime-extensions is not installed, so the plugin graph runs on ONNX's reference "
            "evaluator alone (slow); pip install onnxruntime-extensions"
        )
        runner = "reference"
    if target == "trt" and runner == "reference":
        from attn_export.plugins import reference_ops

        ops = reference_ops()
        return lambda proto: ReferenceRunner(proto, new_ops=ops)
    if target == "trt":
        from attn_export.runtime.runners import PluginGraphRunner

        built = [0]  # the cross-check runs once, on the first graph (the shipped one): the probe adds outputs

        def plugin_runner(proto):
            built[0] += 1
            return PluginGraphRunner(proto, cross_check=built[0] == 1)

        return plugin_runner
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
    *,
    reference: nn.Module | None = None,
    cases: Sequence | None = None,
    sized: bool = False,
    compared: dict[str, str] | None = None,
) -> VerifyReport:
    """Compare PyTorch with the target's ONNX backend (:data:`VERIFY_BACKENDS`) on the graph ``shipped``,
    and block by block on ``probe`` (the graph that also returns the blocks' outputs).

    ``model`` is the module that was exported (adapted, BatchNorm folded): its blocks are probed.
    ``reference`` (default ``model``) is what the graph's outputs are compared with: the user's model
    as given, in eval mode. ``cases`` (``(batch, {input name: shape})`` each) replace ``batches`` and
    ``input_shape`` for several inputs or image sizes.

    The backend: onnxruntime on CPU for ``ort``; for ``trt``, the plugin graph with the numpy
    implementations of the plugin nodes (TensorRT itself is not needed, so the plugin graph is checked on
    any machine).
    """
    from attn_export.runtime.runners import TorchRunner

    if cases is None:
        cases = [(int(b), {INPUT_NAME: tuple(input_shape)}) for b in batches]
    names = list(cases[0][1])
    make_runner = _runner_factory(target)
    runner = make_runner(shipped)
    probe_runner = make_runner(probe) if block_paths else None
    probe_mod = Probe(model, block_paths)
    try:
        exported = TorchRunner(probe_mod, names)
        original = TorchRunner(reference, names) if reference is not None and reference is not model else None
        return compare_runners(
            original or exported,
            runner,
            VERIFY_BACKENDS[target],
            names[0],
            cases[0][1][names[0]],
            [b for b, _ in cases],
            output_names,
            atol,
            rtol,
            seed,
            probe=probe_runner,
            block_paths=block_paths,
            probe_reference=exported if original is not None else None,
            cases=cases,
            sized=sized,
            compared=compared,
        )
    finally:
        probe_mod.remove()


@contextlib.contextmanager
def _warnings_to_debug() -> Iterator[None]:
    """torch's ``UserWarning``s and the like go to the debug log (the CLI shows them with -v)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                log.debug("warning: %s:%s: %s: %s", w.filename, w.lineno, w.category.__name__, w.message)


def _training_modules(model: nn.Module) -> list[str]:
    """Paths of the submodules left in train mode that behave differently in eval (Dropout, BatchNorm...)."""
    modes = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)
    return [p or "<model>" for p, m in model.named_modules() if m.training and isinstance(m, modes)]


@_warnings_to_debug()  # a contextmanager is also a decorator: every call records its own warnings
def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
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
    dynamic_hw: tuple[int, int, int] | str | None = None,
    inputs: Mapping[str, Sequence[int]] | None = None,
) -> ExportResult:
    """Export ``model`` to ONNX at ``output`` with a dynamic batch axis, then verify it.

    ``input_shape`` is the input's shape without the batch; ``inputs={name: shape}`` gives several
    named tensor inputs instead (passed to ``forward`` by name where the names are its parameters,
    else in the order given). ``dynamic_hw=(min, opt, max)`` (or ``"MIN:OPT:MAX"``) makes the height
    and width of the image inputs (rank 3 without the batch) symbolic too, both sides ranging over
    ``min..max``; the verification then runs at MIN, OPT, MAX, an odd and a non-square size. A model
    that cannot take a free size (a fixed position embedding, a flatten into a fixed ``Linear``) is
    exported at its given size, and the result's ``hw_refused`` says why.

    ``target="ort"`` lowers the attn-export ops into standard ONNX ops, verified on onnxruntime;
    ``target="trt"`` writes each op call as one TensorRT plugin node (everything else standard ONNX),
    verified with the numpy plugin references, at batches capped at :data:`TRT_VERIFY_MAX_BATCH`.

    The graph's outputs are compared with ``model`` as given (a deep copy in eval mode, float32: not
    adapted, not BatchNorm-folded), so a wrong adaptation cannot pass; each attn-export block's output
    is compared with the same block in the exported copy, to say where a difference starts. A model
    in train mode is exported in eval mode: ``progress`` says so, and the result's ``mode`` records it.

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
    hw = parse_hw(dynamic_hw) if dynamic_hw is not None else None
    specs = check_inputs(input_shape, inputs)
    output = Path(output)
    if output.exists() and output.is_dir():
        raise ExportError(f"{output}: is a directory; give a file path for the ONNX model")
    if not output.parent.exists():
        raise ExportError(f"{output.parent}: the output folder does not exist")
    first_name, first_shape = next(iter(specs.items()))
    result = ExportResult(None, target, first_name, first_shape, [], batch, opset)
    stage = _Stage(result.timings, progress)
    with stage("prepare"):
        given = _training_modules(model)
        result.mode = {"given": "train" if model.training or given else "eval", "exported": "eval"}
        reference = None
        if copy_model:
            try:
                reference = copy.deepcopy(model)
                model = copy.deepcopy(model)
            except Exception as e:
                raise ExportError(
                    f"prepare: the model cannot be deep-copied ({first_line(e)}); export_onnx works on a copy so "
                    "that your model stays as it is: pass copy_model=False to export it in place"
                ) from e
        else:
            try:  # the reference the graph is compared with; in place, the model itself is about to change
                reference = copy.deepcopy(model)
            except Exception:
                reference = None
        # Never chain on what train()/eval() return: mmcv/mmdet-style backbones override train()
        # without returning self.
        for m in (model, reference):
            if m is not None:
                m.eval()
                m.float()
        specs = order_inputs(model, specs)
        check_forward(model, specs)
    if result.mode["given"] == "train":
        which = ", ".join(given[:4]) + (f" and {len(given) - 4} more" if len(given) > 4 else "")
        result.mode["note"] = (
            "the model was in train mode; it is exported and verified in eval mode (Dropout off, BatchNorm on its "
            "running statistics)" + (f": {which}" if which else "")
        )
        stage.say("prepare", f"warning: {result.mode['note']}")
    result.inputs = [{"name": n, "shape": ["batch", *s]} for n, s in specs.items()]

    with stage("run"):
        # the user's batch in what the user sees; the trace below uses a batch of 2 or more, since torch.export
        # specialises sizes 0 and 1
        try:
            with torch.no_grad():
                first = model(*sample_inputs(specs, batch[1]))
        except Exception as e:
            raise ExportError(
                f"run: the model does not run on {describe_inputs(specs, batch[1])}: {first_line(e)}"
            ) from e
        leaves = torch.utils._pytree.tree_leaves(first)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)}) or ["nothing"]
            raise ExportError(
                f"run: the model returns {', '.join(kinds)} besides tensors; an ONNX graph returns tensors only "
                "(return a tensor, or a tuple/list/dict of tensors)"
            )
        n_out = len(leaves)
        result.output_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]

    trace_batch = max(2, batch[1])
    with stage("adapt"):
        sample = sample_inputs(specs, trace_batch)
        if len(sample) == 1:
            model, result.adapted = adapt(model, sample[0])
        else:  # adapt runs model(sample): one argument, here the tuple that Splat spreads
            splat, result.adapted = adapt(Splat(model), sample)
            model = splat.model
            for r in result.adapted:
                r.path = "" if r.path == "model" else r.path.removeprefix("model.")
        # BatchNorm folded into the convs (half precision starts from it); in place: the model is the
        # export's own copy, or the caller asked for an in-place export (copy_model=False)
        model = prepare_for_inference(model, inplace=True)
        result.blocks = find_blocks(model)
    for r in result.adapted:
        stage.say("adapt", f"{r.path or '<model>'}: {r.foreign} {r.action} {r.reason}".rstrip())
    stage.say("adapt", f"{len(result.blocks)} attn-export block(s): {', '.join(result.blocks) or 'none'}")

    batches = _verify_batches(batch, first_shape, target)
    images = [n for n, s in specs.items() if len(s) == 3]
    dynamic = [n for n in images if specs[n][1:] == specs[images[0]][1:]] if hw and images else []
    sizes: list[tuple[int, int]] = []
    if hw and not dynamic:
        raise ExportError("--dynamic-hw: no image input (C, H, W) to make height and width dynamic")
    trace_hw: tuple[int, int] = (0, 0)
    if hw:
        with stage("sizes"):
            sizes, result.hw_multiple, result.hw_refused = plan_sizes(model, specs, dynamic, hw, batches[0])
            opt = rounded_hw(hw, result.hw_multiple)[1]
            trace_hw = (opt, opt)
        if result.hw_multiple > 1:
            stage.say(
                "sizes",
                f"height and width must be multiples of {result.hw_multiple}: verified at "
                f"{', '.join(f'{h}x{w}' for h, w in sizes)}",
            )
    table = onnx_translation_table(target)
    names = result.output_names + [f"block:{p}" for p in result.blocks]
    proto = None
    if hw and not result.hw_refused:
        sample = sample_inputs(shapes_at(specs, dynamic, trace_hw), trace_batch)
        with stage("export"), function_rewrites():
            try:
                proto = _export_probe(model, result.blocks, sample, table, opset, list(specs), True, batch[1])
            except SizeRefused as e:
                result.hw_refused = str(e)
    if proto is None:
        sample = sample_inputs(specs, trace_batch)
        with stage("export"), function_rewrites():
            proto = _export_probe(model, result.blocks, sample, table, opset, list(specs), False, batch[1])
    if hw and result.hw_refused:
        h, w = specs[dynamic[0]][1:]
        stage.say("export", f"height and width stay static at {h}x{w}: {result.hw_refused}")
        sizes = []
    elif hw:
        result.dynamic_hw = hw
    stage.say("export", f"torch.onnx (dynamo) opset {opset}, target {target}, {len(proto.graph.node)} nodes")

    with stage("surgery"):
        shipped = clean_graph(proto, result.output_names, n_out, target)
        n_probe = len(proto.graph.output)
        probe_graph = clean_graph(proto, names[:n_probe], n_probe, target) if result.blocks else None
    result.nodes = len(shipped.graph.node)
    result.ops = dict(collections.Counter(n.op_type for n in shipped.graph.node).most_common())
    stage.say("surgery", f"{result.nodes} nodes, ops: {', '.join(result.ops)}")
    if target == "trt":
        result.plugins = check_plugin_nodes(shipped)
        listed = ", ".join(f"{k} x{v}" for k, v in result.plugins.items()) or "none (no attn-export op in the model)"
        stage.say("surgery", f"TensorRT plugin nodes: {listed}")

    if verify:
        with stage("verify"):
            if result.dynamic_hw:
                cases = [(b, shapes_at(specs, dynamic, trace_hw)) for b in batches]
                cases += [(batches[0], shapes_at(specs, dynamic, s)) for s in sizes if s != trace_hw]
            else:
                cases = [(b, dict(specs)) for b in batches]
            compared = {
                "outputs": f"the exported graph on {VERIFY_BACKENDS[target].split(' (')[0]} against your model as "
                "given (a deep copy in eval mode, float32: not adapted, BatchNorm not folded)",
                "blocks": "each attn-export block's output in the graph against the same block in the exported "
                "PyTorch copy (adapted, BatchNorm folded), to show where a difference starts",
                "adapted": "the exported PyTorch copy (adapted, BatchNorm folded) against your model as given",
            }
            if reference is None:
                compared["outputs"] = (
                    "the exported graph against the exported PyTorch copy (your model could not be deep-copied, and "
                    "copy_model=False changed it in place)"
                )
                compared.pop("adapted")
            result.report = verify_onnx(
                model,
                shipped,
                probe_graph,
                first_shape,
                batches,
                result.output_names,
                result.blocks,
                atol,
                rtol,
                seed,
                target=target,
                reference=reference,
                cases=cases,
                sized=bool(result.dynamic_hw),
                compared=compared,
            )
        capped = " (capped: the plugin graph's check is slow)" if target == "trt" and max(batches) < batch[2] else ""
        verdict = "passed" if result.report.passed else "FAILED"
        at = f" at sizes {', '.join(f'{h}x{w}' for h, w in sizes)}" if result.dynamic_hw else ""
        stage.say("verify", f"batches {batches}{capped}{at} on {result.report.backend}: {verdict}")

    if result.report is not None and not result.report.passed:
        kept = output.with_name(output.stem + ".unverified.onnx")
        with stage("write"):
            write_bytes(kept, shipped.SerializeToString())
        stage.say("write", f"verification failed; the graph is kept at {kept} for inspection, not at {output}")
        return result
    with stage("write"):
        props = {str(k): v for k, v in (metadata or {}).items()}  # e.g. the checkpoint's class names
        # what the graph accepts, as the export found it (a caller's own "dynamic_hw" entry is replaced)
        props["dynamic_hw"] = result.to_dict()["dynamic_hw"]
        for key, value in props.items():
            if value is not None:
                entry = shipped.metadata_props.add()
                entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        result.size_bytes = write_bytes(output, shipped.SerializeToString())
    result.path = output
    return result


def _export_probe(model, blocks, sample, table, opset, input_names, dynamic_hw, asked_batch):
    """The torch export of ``model`` wrapped in a :class:`Probe` of ``blocks``: the ONNX ``ModelProto``.

    A failure quoting shapes at the traced batch where the user asked for another (OPT 1 is traced at 2)
    says why that batch appears."""
    probe = Probe(model, blocks)
    try:
        return torch_onnx_export(probe, sample, table, opset, dynamic_hw=dynamic_hw, input_names=input_names)
    except SizeRefused:
        raise
    except Exception as e:
        msg = export_failure(e, model, sample if len(sample) > 1 else sample[0], table, opset)
        traced = sample[0].shape[0]
        if traced != asked_batch and re.search(rf"[(\[]{traced}, ", msg):
            msg += f" (shapes at the traced batch of {traced}: torch.export fixes sizes of 1, so OPT 1 is traced at 2)"
        raise ExportError(msg) from e
    finally:
        probe.remove()
