"""Compare runners with PyTorch: one comparator for every backend, one report, one table.

:func:`compare_runners` runs a reference (:class:`~attn_export.runtime.runners.TorchRunner`) and a
runner from :mod:`attn_export.runtime` (onnxruntime on the portable graph, ONNX's reference evaluator
on the plugin graph, a TensorRT engine) on the same fresh random inputs and compares every output
(Polygraphy's ``Comparator.run``). Running and comparing are separate steps with plain result objects:
:func:`compare_outputs` gives per-output error statistics, :class:`VerifyReport` holds them and prints
the table. A check passes when every element satisfies ``|out - ref| <= atol + rtol * |ref|``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from attn_export.export.errors import ExportError, first_line
from attn_export.runtime.runners import Runner


@dataclass
class OutputCheck:
    """Error statistics of one output at one batch size."""

    name: str
    batch: int
    shape: list[int]
    max_abs: float | None  # None where nothing could be compared (see ``problem``)
    max_rel: float | None
    mean_abs: float | None
    p99_abs: float | None
    atol: float
    rtol: float
    passed: bool
    problem: str = ""  # what went wrong besides the tolerance (e.g. a shape that differs), in words
    graph_shape: list[int] | None = None  # the graph's shape, where it differs from PyTorch's (``shape``)
    height: int | None = None  # the image input's height and width at this check (graphs with dynamic_hw)
    width: int | None = None


#: One verification run: a batch size and each input's shape without the batch.
Case = tuple[int, Mapping[str, Sequence[int]]]


@dataclass
class VerifyReport:
    """The result of verifying an exported graph against PyTorch."""

    backend: str
    seed: int
    batches: list[int]
    outputs: list[OutputCheck] = field(default_factory=list)
    blocks: list[OutputCheck] = field(default_factory=list)
    #: the exported (adapted, BatchNorm-folded) copy in PyTorch against the reference model: where the
    #: outputs fail while the blocks pass, this says whether the adaptation changed the results
    adapted: list[OutputCheck] = field(default_factory=list)
    #: what was compared with what, in words: {"outputs": ..., "blocks": ..., "adapted": ...}
    compared: dict[str, str] = field(default_factory=dict)
    #: one entry per run: [batch, height, width] (height and width None for a graph of fixed size)
    sizes: list[list[int | None]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(c.passed for c in self.outputs)

    @property
    def problems(self) -> list[str]:
        """Each distinct problem found (shape differences and missing outputs), in order."""
        out: list[str] = []
        for c in [*self.outputs, *self.blocks]:
            if c.problem and c.problem not in out:
                out.append(c.problem)
        return out

    @property
    def first_divergent_block(self) -> str | None:
        for c in self.blocks:
            if not c.passed:
                return c.name
        return None

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "seed": self.seed,
            "batches": self.batches,
            "sizes": self.sizes,
            "compared": self.compared,
            "passed": self.passed,
            "first_divergent_block": self.first_divergent_block,
            "problems": self.problems,
            "outputs": [asdict(c) for c in self.outputs],
            "blocks": [asdict(c) for c in self.blocks],
            "adapted": [asdict(c) for c in self.adapted],
        }

    def table(self) -> str:
        """A fixed-width table of every check, outputs first, then blocks in execution order."""
        sized = any(c.height is not None for c in [*self.outputs, *self.blocks])
        size_head = f" {'size':>9}" if sized else ""
        head = (
            f"{'check':<34} {'batch':>5}{size_head} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'p99 abs':>10}"
            "  result"
        )
        lines = [head, "-" * len(head)]
        for kind, checks in (("output", self.outputs), ("block", self.blocks), ("adapted", self.adapted)):
            for c in checks:
                label = f"{kind} {c.name}"
                label = label if len(label) <= 34 else "…" + label[-33:]
                stats = " ".join(f"{_num(v):>10}" for v in (c.max_abs, c.max_rel, c.mean_abs, c.p99_abs))
                verdict = "ok" if c.passed else ("FAIL (shape)" if c.graph_shape is not None else "FAIL")
                size = f" {f'{c.height}x{c.width}' if c.height is not None else '-':>9}" if sized else ""
                lines.append(f"{label:<34} {c.batch:>5}{size} {stats}  {verdict}")
        verdict = "PASSED" if self.passed else "FAILED"
        tol = f"atol={self.outputs[0].atol:g}, rtol={self.outputs[0].rtol:g}" if self.outputs else ""
        lines.append(f"verification {verdict} on {self.backend} ({tol}, seed {self.seed})")
        if "outputs" in self.compared:
            lines.append(f"outputs: {self.compared['outputs']}")
        if self.first_divergent_block:
            lines.append(f"first block to diverge: {self.first_divergent_block}")
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def shape_problem(name: str, batch: int, ref_shape: tuple[int, ...], got_shape: tuple[int, ...]) -> str:
    """Why PyTorch's and the graph's shapes differ, in words."""
    said = f"{name}: at batch {batch} PyTorch gave shape {tuple(ref_shape)} while the graph gives {tuple(got_shape)}"
    if batch == 1 and len(got_shape) == len(ref_shape) + 1 and got_shape[0] == 1 and tuple(got_shape[1:]) == ref_shape:
        return (
            f"{said}, because the model drops its batch axis at batch 1 (e.g. torch.squeeze(x) or x.squeeze() "
            "without a dim removes every axis of size 1, the batch too); the graph keeps the batch axis at every "
            "batch. Squeeze named dims (x.squeeze(-1), x.flatten(1)) so batch 1 is shaped like the others"
        )
    return f"{said}: the model's output shape depends on the batch in a way the graph does not follow"


def compare_arrays(name: str, batch: int, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Statistics of ``out`` against ``ref`` (computed in float64)."""
    if ref.shape != out.shape:
        problem = shape_problem(name, batch, ref.shape, out.shape)
        if ref.size != out.size:
            return OutputCheck(
                name, batch, list(ref.shape), None, None, None, None, atol, rtol, False, problem, list(out.shape)
            )
        same = compare_arrays(name, batch, ref, out.reshape(ref.shape), atol, rtol)  # the values, for the record
        same.passed, same.problem, same.graph_shape = False, problem, list(out.shape)
        return same
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    diff = np.abs(o - r)
    finite = bool(np.isfinite(o).all() == np.isfinite(r).all())
    if diff.size == 0:
        return OutputCheck(name, batch, list(ref.shape), 0.0, 0.0, 0.0, 0.0, atol, rtol, True)
    diff = np.where(np.isnan(diff) & np.isnan(o) & np.isnan(r), 0.0, diff)
    rel = diff / np.maximum(np.abs(r), np.finfo(np.float32).tiny)
    passed = finite and bool(np.all(diff <= atol + rtol * np.abs(r)))
    return OutputCheck(
        name,
        batch,
        list(ref.shape),
        float(diff.max()),
        float(rel.max()),
        float(diff.mean()),
        float(np.quantile(diff, 0.99)),
        atol,
        rtol,
        passed,
    )


def compare_outputs(
    ref: Mapping[str, np.ndarray],
    out: Mapping[str, np.ndarray],
    batch: int,
    atol: float,
    rtol: float,
    names: Mapping[str, str] | None = None,
) -> list[OutputCheck]:
    """Compare every output of ``ref`` with the same-named output of ``out``."""
    checks = []
    for key, r in ref.items():
        label = (names or {}).get(key, key)
        if key not in out:
            problem = f"{label}: the graph has no output for it at batch {batch}"
            checks.append(OutputCheck(label, batch, list(r.shape), None, None, None, None, atol, rtol, False, problem))
            continue
        checks.append(compare_arrays(label, batch, r, out[key], atol, rtol))
    return checks


def _block_labels(paths: Sequence[str], count: int) -> list[str]:
    if count == len(paths):
        return list(paths)
    return [f"block[{i}]" for i in range(count)]  # a block called more than once: label by call order


def _case_label(batch: int, shapes: Mapping[str, Sequence[int]]) -> str:
    image = next((v for v in shapes.values() if len(v) == 3), ())
    if image:
        return f"a batch of {batch} at {image[1]}x{image[2]}"
    return f"a batch of {batch}"


def compare_runners(
    reference: Runner,
    runner: Runner,
    backend: str,
    input_name: str,
    input_shape: Sequence[int],
    batches: Sequence[int],
    output_names: Sequence[str],
    atol: float,
    rtol: float,
    seed: int | None = None,
    *,
    probe: Runner | None = None,
    block_paths: Sequence[str] = (),
    probe_reference: Runner | None = None,
    cases: Sequence[Case] | None = None,
    sized: bool = False,
    compared: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Run ``reference`` and ``runner`` on the same fresh random inputs (standard normal, one batch of
    each size in ``batches``, from ``seed``) and compare every output; ``backend`` names ``runner`` in
    the report.

    ``reference`` returns the model's outputs in order, which ``runner`` returns under
    ``output_names``. With a ``probe`` (``runner``'s backend on the graph that also returns the
    outputs of the blocks at ``block_paths``, after the model's), the block outputs come from
    ``probe_reference`` (the model that was exported, with the same blocks probed; default
    ``reference``) after the model's, and they are compared block by block (the report's ``blocks``).
    With a ``probe_reference``, its model outputs are compared with ``reference``'s too (the report's
    ``adapted``: did adapting the model change its results?).

    ``cases`` replaces ``batches``/``input_name``/``input_shape``: each is ``(batch, {input name: shape
    without the batch})``, for several inputs and several image sizes; ``sized`` records each check's
    height and width (those of the first input). A runner that fails raises :class:`ExportError`
    naming the batch (and the size).
    """
    seed = secrets.randbits(31) if seed is None else seed
    rng = np.random.default_rng(seed)
    if cases is None:
        cases = [(int(b), {input_name: tuple(input_shape)}) for b in batches]
    report = VerifyReport(backend, seed, sorted({int(b) for b, _ in cases}), compared=dict(compared or {}))
    n = len(output_names)
    block_ref = probe_reference or reference
    for b, shapes in cases:
        image = next((tuple(v) for v in shapes.values() if len(v) == 3), ())
        hw = (image[1], image[2]) if sized and image else (None, None)
        report.sizes.append([int(b), *hw])
        where = _case_label(b, shapes) if sized else f"a batch of {b}"
        feeds = {name: rng.standard_normal((b, *shape), dtype=np.float32) for name, shape in shapes.items()}
        try:
            ref = list(reference.infer(feeds).values())
            mine = list(block_ref.infer(feeds).values()) if probe_reference is not None else ref
        except Exception as e:
            raise ExportError(
                f"verification: the PyTorch model fails on {where} ({first_line(e)}); the model "
                "must run at every input size the ONNX graph accepts"
            ) from e
        try:
            got = runner.infer(feeds)
            got_all = probe.infer(feeds) if probe is not None else {}
        except Exception as e:
            raise ExportError(
                f"verification: {backend} cannot run the exported graph on {where} ({first_line(e)})"
            ) from e
        new: list[OutputCheck] = []
        checks = compare_outputs(dict(zip(output_names, ref[:n], strict=True)), got, b, atol, rtol)
        report.outputs += checks
        new += checks
        if probe_reference is not None:
            checks = compare_outputs(
                dict(zip(output_names, ref[:n], strict=True)),
                dict(zip(output_names, mine[:n], strict=True)),
                b,
                atol,
                rtol,
            )
            report.adapted += checks
            new += checks
        if probe is not None:
            labels = _block_labels(block_paths, len(mine) - n)
            refs = dict(zip(labels, mine[n:], strict=True))
            got_blocks = dict(zip(labels, list(got_all.values())[n:], strict=False))
            checks = compare_outputs(refs, got_blocks, b, atol, rtol)
            report.blocks += checks
            new += checks
        for c in new:
            c.height, c.width = hw
    return report
