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
