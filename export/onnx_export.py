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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attn_export.export.adapt import AdaptRecord, adapt, function_rewrites
from attn_export.export.compare import VerifyReport, compare_runners
from attn_export.export.errors import ExportError, first_line
from attn_export.export.profile import parse_batch
from attn_export.export.surgery import check_plugin_nodes, clean_graph
from attn_export.export.torch_export import INPUT_NAME, Probe, export_failure, find_blocks, torch_onnx_export
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
    from attn_export.runtime.runners import OnnxRuntimeRunner, ReferenceRunner

    if target == "trt" and TRT_VERIFY_RUNNER == "reference":
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
) -> VerifyReport:
    """Compare PyTorch with the target's ONNX backend (:data:`VERIFY_BACKENDS`) on the graph ``shipped``,
    and block by block on ``probe`` (the graph that also returns the blocks' outputs).

    The backend: onnxruntime on CPU for ``ort``; for ``trt``, ONNX's reference evaluator with the numpy
    implementations of the plugin nodes (TensorRT itself is not needed, so the plugin graph is checked on
    any machine).
    """
    from attn_export.runtime.runners import TorchRunner

    make_runner = _runner_factory(target)
    runner = make_runner(shipped)
    probe_runner = make_runner(probe) if block_paths else None
    probe_mod = Probe(model, block_paths)
    try:
        reference = TorchRunner(probe_mod, [INPUT_NAME])
        backend = VERIFY_BACKENDS[target]
        return compare_runners(
            reference,
            runner,
            backend,
            INPUT_NAME,
            input_shape,
            batches,
            output_names,
            atol,
            rtol,
            seed,
            probe=probe_runner,
            block_paths=block_paths,
        )
    finally:
        probe_mod.remove()


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
                    f"prepare: the model cannot be deep-copied ({first_line(e)}); export_onnx works on a copy so "
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
                f"the model does not run on an input of shape {tuple(sample.shape)}: {first_line(e)}"
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
        probe = Probe(model, result.blocks)
        try:
            names = result.output_names + [f"block:{p}" for p in result.blocks]
            proto = torch_onnx_export(probe, (sample,), table, opset)
        except Exception as e:
            probe.remove()
            raise ExportError(export_failure(e, model, sample, table, opset)) from e
        probe.remove()
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
            write_bytes(kept, shipped.SerializeToString())
        stage.say("write", f"verification failed; the graph is kept at {kept} for inspection, not at {output}")
        return result
    with stage("write"):
        for key, value in (metadata or {}).items():  # e.g. the checkpoint's class names, for the service
            if value is not None:
                entry = shipped.metadata_props.add()
                entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
        result.size_bytes = write_bytes(output, shipped.SerializeToString())
    result.path = output
    return result
