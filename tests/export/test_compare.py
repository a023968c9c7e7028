"""The comparator (:mod:`attn_export.export.compare`): the rule ``|out - ref| <= atol + rtol * |ref|``
element-wise, the report and its table, and :func:`compare_runners` over PyTorch and any runner,
with the TensorRT engine's parity run on a stand-in runner (no TensorRT needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from attn_export.export import ExportError
from attn_export.export import trt_build as tb
from attn_export.export.compare import OutputCheck, VerifyReport, compare_arrays, compare_outputs, compare_runners
from attn_export.runtime.runners import Runner, TorchRunner

ATOL, RTOL = 1e-4, 1e-3
REF = np.array([[0.0, 1.0, -2.0], [100.0, -0.5, 3e-5]], dtype=np.float64)


@pytest.mark.parametrize("index", [(0, 0), (0, 2), (1, 0), (1, 2)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_compare_arrays_tolerance_boundary(index, sign):
    bound = ATOL + RTOL * abs(REF[index])
    inside = REF.copy()
    inside[index] += sign * 0.99 * bound
    check = compare_arrays("y", 2, REF, inside, ATOL, RTOL)
    assert check.passed
    assert check.max_abs == pytest.approx(0.99 * bound, rel=1e-9)

    outside = REF.copy()
    outside[index] += sign * 1.01 * bound
    check = compare_arrays("y", 2, REF, outside, ATOL, RTOL)
    assert not check.passed
    assert check.max_abs == pytest.approx(1.01 * bound, rel=1e-9)
    assert (check.name, check.batch, check.shape, check.atol, check.rtol) == ("y", 2, [2, 3], ATOL, RTOL)


def test_compare_arrays_identical_and_float32():
    ref = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    check = compare_arrays("y", 4, ref, ref.copy(), ATOL, RTOL)
    assert check.passed
    assert check.max_abs == check.mean_abs == check.p99_abs == check.max_rel == 0.0


def test_compare_arrays_relative_part_matters():
    # 0.05 off on 100.0 is within atol + rtol * 100 = 0.1001; the same error on 1.0 is not.
    assert compare_arrays("y", 1, np.array([100.0]), np.array([100.05]), ATOL, RTOL).passed
    assert not compare_arrays("y", 1, np.array([1.0]), np.array([1.05]), ATOL, RTOL).passed


def test_compare_arrays_statistics():
    ref = np.zeros(100)
    out = np.zeros(100)
    out[:10] = 1e-5
    out[-1] = 2e-5
    check = compare_arrays("y", 1, ref, out, ATOL, RTOL)
    assert check.passed
    assert check.max_abs == pytest.approx(2e-5)
    assert check.mean_abs == pytest.approx((10 * 1e-5 + 2e-5) / 100)
    assert 0 < check.p99_abs <= check.max_abs


def test_compare_arrays_shape_mismatch():
    check = compare_arrays("y", 2, np.zeros((2, 3)), np.zeros((2, 4)), ATOL, RTOL)
    assert not check.passed
    assert check.shape == [2, 3] and check.graph_shape == [2, 4]
    assert check.max_abs is None  # nothing to compare: no inf
    assert "at batch 2 PyTorch gave shape (2, 3) while the graph gives (2, 4)" in check.problem
    check = compare_arrays("y", 2, np.zeros((2, 3)), np.zeros((3, 2)), ATOL, RTOL)
    assert not check.passed and check.problem


def test_compare_arrays_batch_axis_dropped_at_batch_1():
    ref = np.random.default_rng(0).standard_normal(10)
    check = compare_arrays("output", 1, ref, ref[None].astype(np.float32), ATOL, RTOL)
    assert not check.passed
    assert check.shape == [10] and check.graph_shape == [1, 10]
    assert check.max_abs is not None and check.max_abs < 1e-6  # the values themselves agree
    assert "PyTorch gave shape (10,) while the graph gives (1, 10)" in check.problem
    assert "drops its batch axis at batch 1" in check.problem


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # np.quantile over inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_compare_arrays_non_finite_output_fails(bad):
    out = REF.copy()
    out[0, 1] = bad
    assert not compare_arrays("y", 2, REF, out, ATOL, RTOL).passed


def test_compare_arrays_nan_in_reference_only_fails():
    ref = REF.copy()
    ref[1, 1] = np.nan
    assert not compare_arrays("y", 2, ref, REF, ATOL, RTOL).passed


def test_compare_arrays_nan_in_different_places_fails():
    ref, out = REF.copy(), REF.copy()
    ref[0, 0] = np.nan
    out[1, 1] = np.nan
    assert not compare_arrays("y", 2, ref, out, ATOL, RTOL).passed


def test_compare_arrays_empty():
    assert compare_arrays("y", 0, np.zeros((0, 3)), np.zeros((0, 3)), ATOL, RTOL).passed


def test_compare_outputs_missing_output_fails():
    checks = compare_outputs({"a": REF, "b": REF}, {"a": REF}, 2, ATOL, RTOL)
    assert [(c.name, c.passed) for c in checks] == [("a", True), ("b", False)]


def _check(name: str, batch: int, passed: bool) -> OutputCheck:
    return OutputCheck(name, batch, [batch, 3], 0.0, 0.0, 0.0, 0.0, ATOL, RTOL, passed)


def test_verify_report_verdicts_and_table():
    report = VerifyReport("backend", 5, [1, 2])
    assert not report.passed  # no outputs checked is not a pass
    report.outputs = [_check("output", 1, True), _check("output", 2, False)]
    report.blocks = [_check("stem", 1, True), _check("mid", 1, False), _check("head", 1, False)]
    assert not report.passed
    assert report.first_divergent_block == "mid"
    table = report.table()
    assert "FAIL" in table and "verification FAILED" in table
    assert "first block to diverge: mid" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["first_divergent_block"] == "mid" and data["seed"] == 5
    report.outputs[1] = _check("output", 2, True)
    assert report.passed  # block differences alone do not fail the export


# ------------------------------------------------------------------------------------------ compare_runners
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(1), nn.Linear(4 * 8 * 8, 5)).eval()


class StandInEngine(Runner):
    """A runner that answers with the model's outputs (plus ``offset``), as a built engine would."""

    name = "stand-in"

    def __init__(self, model: nn.Module, offset: float = 0.0, fail: bool = False) -> None:
        self.torch = TorchRunner(model, ["input"], ["output"])
        self.input_names, self.output_names = ["input"], ["output"]
        self.provider = "no GPU"
        self.offset, self.fail, self.seen = offset, fail, []

    def infer(self, feeds):
        self.seen.append(feeds["input"].shape[0])
        if self.fail:
            raise RuntimeError("engine lost\nsecond line")
        return {k: v + self.offset for k, v in self.torch.infer(feeds).items()}


def test_compare_runners_reports_every_batch():
    model = _net()
    engine = StandInEngine(model)
    report = compare_runners(
        TorchRunner(model, ["input"], ["output"]),
        engine,
        backend="stand-in backend",
        input_name="input",
        input_shape=(3, 8, 8),
        batches=[1, 3],
        output_names=["output"],
        atol=1e-5,
        rtol=1e-5,
        seed=7,
    )
    assert report.passed and report.backend == "stand-in backend" and report.seed == 7
    assert [(c.name, c.batch) for c in report.outputs] == [("output", 1), ("output", 3)] and not report.blocks
    assert engine.seen == [1, 3]


def test_engine_parity_on_a_stand_in_runner():
    """The TensorRT engine's parity (``verify_engine``, what ``--trt`` prints) is the same comparator."""
    model = _net()
    report = tb.verify_engine(model, StandInEngine(model), "input", (3, 8, 8), [1, 2], ["output"], 1e-5, 1e-5, 3)
    assert report.passed and report.batches == [1, 2] and report.seed == 3
    assert report.backend == "TensorRT engine (stand-in (no GPU))"
    assert "verification PASSED on TensorRT engine (stand-in (no GPU))" in report.table()
    off = tb.verify_engine(model, StandInEngine(model, 1.0), "input", (3, 8, 8), [2], ["output"], 1e-5, 1e-5, 3)
    assert not off.passed and off.outputs[0].max_abs == pytest.approx(1.0)


def test_a_runner_that_fails_names_the_batch():
    model = _net()
    with pytest.raises(
        ExportError, match=r"cannot run the exported graph on a batch of 2 \(RuntimeError: engine lost\)"
    ):
        tb.verify_engine(model, StandInEngine(model, fail=True), "input", (3, 8, 8), [2], ["output"], 1e-5, 1e-5)


class SizedEngine(Runner):
    """Answers with ``model``'s outputs for any image size, counting the sizes it was given."""

    name = "sized"

    def __init__(self, model: nn.Module, names=("image", "mask"), offset: float = 0.0) -> None:
        self.model, self.input_names, self.output_names = model, list(names), ["output"]
        self.provider, self.offset, self.seen = "cpu", offset, []

    def infer(self, feeds):
        self.seen.append(tuple(feeds[self.input_names[0]].shape))
        with torch.no_grad():
            out = self.model(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        return {"output": out.numpy() + self.offset}


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image, mask):
        return self.conv(image) * mask


def test_compare_runners_cases_of_several_inputs_and_sizes():
    """``cases``: each input's shape per run; ``sized``: one report row per (batch, height, width)."""
    torch.manual_seed(1)
    model = Gate().eval()
    cases = [(b, {"image": (3, h, w), "mask": (1, h, w)}) for b, h, w in [(2, 8, 8), (1, 7, 13), (1, 16, 5)]]
    engine = SizedEngine(model)
    report = compare_runners(
        TorchRunner(model, ["image", "mask"], ["output"]), engine, "sized", "image", (3, 8, 8), [], ["output"],
        1e-6, 1e-6, seed=2, cases=cases, sized=True,
    )  # fmt: skip
    assert report.passed and engine.seen == [(2, 3, 8, 8), (1, 3, 7, 13), (1, 3, 16, 5)]
    assert report.sizes == [[2, 8, 8], [1, 7, 13], [1, 16, 5]] and report.batches == [1, 2]
    assert [(c.batch, c.height, c.width) for c in report.outputs] == [(2, 8, 8), (1, 7, 13), (1, 16, 5)]
    assert " 7x13 " in report.table()
    off = compare_runners(
        TorchRunner(model, ["image", "mask"], ["output"]), SizedEngine(model, offset=1e-3), "sized", "image",
        (3, 8, 8), [], ["output"], 1e-6, 1e-6, seed=2, cases=cases[1:2], sized=True,
    )  # fmt: skip
    assert not off.passed and off.outputs[0].max_abs == pytest.approx(1e-3, rel=1e-3)


def test_compare_runners_against_the_original_with_blocks_from_the_copy():
    """``probe_reference``: the model that was exported (its outputs, then its blocks'); the outputs are
    compared with ``reference`` (the user's model), the blocks with the copy, and the copy with the user's
    model (``adapted``)."""
    torch.manual_seed(2)
    original = _net()
    copy = _net()
    with torch.no_grad():
        copy[3].bias.add_(0.5)  # the copy's head differs, as after a wrong adaptation

    class WithBlock(nn.Module):  # the copy, returning its conv's output after the model's, like Probe
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x), self.m[0](x)

    engine = TorchRunner(WithBlock(copy), ["input"], ["output", "block"])  # the graph: exactly the copy
    report = compare_runners(
        TorchRunner(original, ["input"]), engine, "copy", "input", (3, 8, 8), [1, 2], ["output"], 1e-5, 1e-5,
        seed=4, probe=engine, block_paths=["0"], probe_reference=TorchRunner(WithBlock(copy), ["input"]),
        compared={"outputs": "graph vs original"},
    )  # fmt: skip
    assert not report.passed  # the graph (= the copy) against the original: caught
    assert [c.passed for c in report.blocks] == [True, True]  # the block in the graph agrees with the copy
    assert [c.passed for c in report.adapted] == [False, False]  # the copy against the original: differs
    assert report.to_dict()["compared"] == {"outputs": "graph vs original"}
    assert "outputs: graph vs original" in report.table()
