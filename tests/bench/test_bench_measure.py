"""The measuring core of ``attn-export bench --device cuda`` on the CPU: the correctness gate never
times a wrong variant, failures and a spent budget are rows, the relative error is strict, and the
switch to the reference kernels is scoped."""

from __future__ import annotations

import math

import pytest
import torch
from cuda_stand_ins import CountingTimer

from attn_export.bench import measure as bm


def test_the_gate_never_times_a_wrong_variant():
    ref = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    timer = CountingTimer()
    row = bm.measure("ops", "x", "broken", "fp32", lambda: ref.float() + 0.01, ref, 1e-4, timer)
    assert row.status == "wrong" and row.ms is None and timer.calls == 0
    assert row.rel_err > 1e-4 and "not timed" in row.note

    rate = bm.gbps(4_000_000, peak=4000.0)  # 4 MB in 2 ms = 2 GB/s, 0.05% of 4000 GB/s
    row = bm.measure("ops", "x", "right", "fp32", lambda: ref.float(), ref, 1e-4, timer, rate)
    assert row.status == "ok" and timer.calls == 1 and row.ms == 2.0
    assert row.metric == "GB/s" and row.value == pytest.approx(2.0) and row.fraction == pytest.approx(0.0005)


def test_a_failing_variant_is_a_row_and_a_spent_budget_skips():
    timer = CountingTimer()

    def boom():
        raise RuntimeError("no kernel image is available")

    row = bm.measure("ops", "x", "v", "fp16", boom, torch.zeros(1), 1.0, timer)
    assert row.status == "error" and "no kernel image" in row.note and timer.calls == 0
    called = []
    spent = bm.Deadline(budget_s=-1.0)
    row = bm.measure("ops", "x", "v", "fp16", lambda: called.append(1), torch.zeros(1), 1.0, timer, deadline=spent)
    assert row.status == "skipped" and not called and timer.calls == 0
    assert bm.failed([row]) == []


def test_a_timer_that_raises_is_an_error_row_not_a_crash():
    ref = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def timer(fn):
        raise RuntimeError("CUDA graph capture failed inside do_bench")

    row = bm.measure("detector", "x", "torch.compile reduce-overhead", "fp32", lambda: ref.float(), ref, 1e-4, timer)
    assert row.status == "error" and row.ms is None and "timing failed" in row.note and "CUDA graph" in row.note
    assert bm.failed([row]) == [row]


def test_rel_error_is_relative_to_the_reference_and_strict_about_shape_and_nan():
    ref = torch.tensor([[10.0, -20.0]], dtype=torch.float64)
    assert bm.rel_error(torch.tensor([[10.0, -19.0]]), ref) == pytest.approx(1 / 20)
    assert bm.rel_error(torch.tensor([10.0, -20.0]), ref) == math.inf  # shape
    assert bm.rel_error(torch.tensor([[math.nan, -20.0]]), ref) == math.inf
    assert bm.rel_error((ref, ref * 2), [ref, ref * 2 + 4]) == pytest.approx(4 / 36)
    assert bm.rel_error((ref,), [ref, ref]) == math.inf  # output count


def test_reference_kernels_switch_is_scoped():
    import attn_export.plugins as plugins
    from attn_export.plugins import _kernels

    before = _kernels._kernels_available
    with bm.reference_kernels():
        assert plugins.use_cuda_kernel(torch.zeros(1)) is False
    assert _kernels._kernels_available is before
