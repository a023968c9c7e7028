"""``attn-export bench --device cuda``: its pure logic, on the CPU with tiny shapes.

The timings themselves need a GPU (``scripts/gpu_check.sh``); here: no CUDA gives a clear error and
exit 3, the correctness gate never times a wrong variant, the op section runs end to end (official
forms, our torch references and our Triton kernels in the interpreter) with a stand-in timer, and the
table and JSON carry every row.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from attn_export.bench import cuda as bc


class CountingTimer:
    def __init__(self, ms: float = 2.0) -> None:
        self.ms, self.calls = ms, 0

    def __call__(self, fn) -> float:
        self.calls += 1
        fn()
        return self.ms


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_the_command_exits_3_and_says_why(capsys):
    from attn_export.bench.blocks import main

    assert main(["--device", "cuda"]) == bc.EXIT_NO_CUDA
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "attn-export bench" in err


def test_bad_arguments_exit_2(capsys):
    assert bc.main(["--sections", "ops,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert bc.main(["--dtypes", "fp64"]) == 2


def test_the_gate_never_times_a_wrong_variant():
    ref = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    timer = CountingTimer()
    row = bc.measure("ops", "x", "broken", "fp32", lambda: ref.float() + 0.01, ref, 1e-4, timer)
    assert row.status == "wrong" and row.ms is None and timer.calls == 0
    assert row.rel_err > 1e-4 and "not timed" in row.note

    rate = bc.gbps(4_000_000, peak=4000.0)  # 4 MB in 2 ms = 2 GB/s, 0.05% of 4000 GB/s
    row = bc.measure("ops", "x", "right", "fp32", lambda: ref.float(), ref, 1e-4, timer, rate)
    assert row.status == "ok" and timer.calls == 1 and row.ms == 2.0
    assert row.metric == "GB/s" and row.value == pytest.approx(2.0) and row.fraction == pytest.approx(0.0005)


def test_a_failing_variant_is_a_row_and_a_spent_budget_skips():
    timer = CountingTimer()

    def boom():
        raise RuntimeError("no kernel image is available")

    row = bc.measure("ops", "x", "v", "fp16", boom, torch.zeros(1), 1.0, timer)
    assert row.status == "error" and "no kernel image" in row.note and timer.calls == 0
    called = []
    spent = bc.Deadline(budget_s=-1.0)
    row = bc.measure("ops", "x", "v", "fp16", lambda: called.append(1), torch.zeros(1), 1.0, timer, deadline=spent)
    assert row.status == "skipped" and not called and timer.calls == 0
    assert bc.failed([row]) == []


def test_rel_error_is_relative_to_the_reference_and_strict_about_shape_and_nan():
    ref = torch.tensor([[10.0, -20.0]], dtype=torch.float64)
    assert bc.rel_error(torch.tensor([[10.0, -19.0]]), ref) == pytest.approx(1 / 20)
    assert bc.rel_error(torch.tensor([10.0, -20.0]), ref) == math.inf  # shape
    assert bc.rel_error(torch.tensor([[math.nan, -20.0]]), ref) == math.inf
    assert bc.rel_error((ref, ref * 2), [ref, ref * 2 + 4]) == pytest.approx(4 / 36)
    assert bc.rel_error((ref,), [ref, ref]) == math.inf  # output count


def test_op_cost_counts_minimal_bytes_and_flops():
    case = bc.OpCase("involution", "t", 1, 4, 5, 5, 3, 1, 2)  # 5x5 out, k=3, G=2
    nbytes, flops = bc.op_cost(case, 4)
    assert nbytes == (100 + 2 * 9 * 25 + 100) * 4 and flops == 2 * 100 * 9
    conv = bc.OpCase("dynamic_conv", "t", 2, 4, 6, 6, 3, 1, 2, 8)  # 6x6 out, Cin/g = 2
    assert bc.op_cost(conv, 2) == ((2 * 4 * 36 + 2 * 8 * 2 * 9 + 2 * 8 * 36) * 2, 2.0 * 2 * 8 * 36 * 2 * 9)


TINY = [
    bc.OpCase("involution", "involution tiny", 2, 4, 7, 9, 3, 1, 2),
    bc.OpCase("dynamic_conv", "dynamic_conv tiny", 2, 4, 7, 5, 3, 1, 2, 6),
    bc.OpCase("outlook", "outlook tiny s2", 1, 4, 7, 9, 3, 2, 2),
]
PEAKS = {"copy_gbps": 100.0, "matmul_fp32_tflops": 1.0, "matmul_tf32_tflops": 2.0}


def test_the_op_section_runs_every_variant_and_gates_it():
    pytest.importorskip("triton")
    timer = CountingTimer()
    rows = bc.run_ops(TINY, ["fp32"], "cpu", timer, bc.Deadline(600), PEAKS, compile_dtypes=())
    expected = []
    for c in TINY:
        expected += [(c.label, v) for v in ("official eager", "ours, torch reference", "ours, Triton")]
        if c.op == "involution":
            expected.append((c.label, "ours, Triton row reuse (candidate)"))
    assert [(r.name, r.variant) for r in rows] == expected
    assert all(r.status == "ok" for r in rows), [(r.name, r.variant, r.note) for r in rows]
    assert timer.calls == len(rows)
    assert {r.metric for r in rows if r.name.startswith("dynamic_conv")} == {"TFLOP/s"}
    assert {r.metric for r in rows if not r.name.startswith("dynamic_conv")} == {"GB/s"}
    assert all(r.fraction is not None and r.rel_err is not None for r in rows)


def test_a_wrong_kernel_in_the_op_section_is_reported_and_not_timed(monkeypatch):
    pytest.importorskip("triton")
    real = bc.ours_op

    def broken(case, triton, tf32):
        fn = real(case, triton, tf32)
        return (lambda *a: fn(*a) * 1.01) if triton is True else fn

    monkeypatch.setattr(bc, "ours_op", broken)
    timer = CountingTimer()
    rows = bc.run_ops(TINY[:1], ["fp32"], "cpu", timer, bc.Deadline(600), PEAKS, compile_dtypes=())
    wrong = [r for r in rows if r.status == "wrong"]
    assert [r.variant for r in wrong] == ["ours, Triton"] and wrong[0].ms is None
    assert timer.calls == len(rows) - 1
    assert bc.failed(rows) == wrong


def test_table_and_json_carry_every_row():
    rows = [
        bc.Row("peaks", "copy 1024 MiB", "dst.copy_(src)", "fp32", ms=0.5, metric="GB/s", value=4300.0),
        bc.Row("ops", "outlook B32", "official eager", "fp16", ms=0.25),
        bc.Row("ops", "outlook B32", "ours, Triton", "fp16", ms=0.1, metric="GB/s", value=1800.0, fraction=0.42),
        bc.Row("ops", "outlook B32", "ours, torch reference", "bf16", "wrong", rel_err=0.5, note="wrong output"),
        bc.Row("detector", "d.pt batch 1", "onnxruntime CUDA", "fp32", "unavailable", note="no CUDA provider"),
    ]
    result = bc.build_result(rows, {"copy_gbps": 4300.0}, {"device": "test", "elapsed_s": 1.0, "budget_s": 170})
    again = json.loads(json.dumps(result))
    assert again["peaks"] == {"copy_gbps": 4300.0} and len(again["rows"]) == 5
    assert again["rows"][2]["speedup"] == pytest.approx(2.5) and again["rows"][3]["speedup"] is None
    assert set(again["rows"][0]) == {
        "section",
        "name",
        "variant",
        "dtype",
        "status",
        "ms",
        "rel_err",
        "metric",
        "value",
        "fraction",
        "speedup",
        "note",
    }
    text = bc.render(result)
    needles = ("## peaks", "## ops", "## detector", "42.0%", "2.50x", "WRONG: wrong output", "UNAVAILABLE")
    for needle in needles:
        assert needle in text, needle
    assert [r.variant for r in bc.failed(rows)] == ["ours, torch reference"]


def test_reference_kernels_switch_is_scoped():
    import attn_export.plugins as plugins

    before = plugins._kernels_available
    with bc.reference_kernels():
        assert plugins.use_cuda_kernel(torch.zeros(1)) is False
    assert plugins._kernels_available is before


def test_the_block_section_adapts_the_official_weights_and_gates_every_variant():
    timer = CountingTimer()
    names = ["involution", "odconv", "outlook", "skconv"]
    rows = bc.run_blocks(
        names, ["fp32"], "cpu", timer, bc.Deadline(600), batch=2, channels=32, size=9, compile_dtypes=()
    )
    assert [(r.name, r.variant) for r in rows] == [
        (n, v) for n in names for v in ("official eager", "ours, CUDA op kernels", "ours, torch reference kernels")
    ]
    assert all(r.status == "ok" for r in rows), [(r.name, r.variant, r.note) for r in rows]
    assert timer.calls == len(rows)
    # ours carries the official weights: its output is the official one (SKConv excepted: another function)
    assert all(r.rel_err < 1e-4 for r in rows if r.name != "skconv")


def test_the_detector_section_measures_images_per_second_and_names_what_is_missing(tmp_path):
    from pathlib import Path

    ckpt = Path(__file__).resolve().parents[2] / "models" / "shapes_detector.pt"
    if not ckpt.exists():
        pytest.skip("the shipped detector is not in this checkout")
    timer = CountingTimer(ms=4.0)
    rows = bc.run_detector(ckpt, "cpu", timer, bc.Deadline(600), batches=(1,), modes=("eager", "ort"))
    eager = [r for r in rows if r.variant == "torch eager"]
    assert len(eager) == 1 and eager[0].status == "ok"
    assert eager[0].metric == "images/s" and eager[0].value == pytest.approx(250.0)
    ort = [r for r in rows if r.variant == "onnxruntime CUDA"]
    assert len(ort) == 1 and ort[0].status in ("ok", "unavailable")
    missing = bc.run_detector(tmp_path / "nope.pt", "cpu", timer, bc.Deadline(600), batches=(1,))
    assert [r.status for r in missing] == ["error"] and "no such file" in missing[0].note


def test_rows_of_two_passes_are_grouped_for_the_table():
    rows = [
        bc.Row("ops", "b", "official eager", "fp32"),
        bc.Row("ops", "b", "ours, Triton", "fp32"),
        bc.Row("ops", "b", "official eager", "fp16"),
        bc.Row("blocks", "gsop", "official eager", "fp32"),
        bc.Row("peaks", "copy", "dst.copy_(src)", "fp32"),
        bc.Row("ops", "b", "torch.compile(official)", "fp32"),  # pass 2
        bc.Row("ops", "b", "torch.compile(official)", "fp16"),
    ]
    got = [(r.section, r.dtype, r.variant) for r in bc.ordered(rows)]
    assert got == [
        ("peaks", "fp32", "dst.copy_(src)"),
        ("ops", "fp32", "official eager"),
        ("ops", "fp32", "torch.compile(official)"),
        ("ops", "fp32", "ours, Triton"),
        ("ops", "fp16", "official eager"),
        ("ops", "fp16", "torch.compile(official)"),
        ("blocks", "fp32", "official eager"),
    ]


def test_the_command_end_to_end_with_its_device_and_timer_stood_in(monkeypatch, tmp_path, capsys):
    """main() as on a GPU, on the CPU: two passes, the table, the JSON file, exit 0; a wrong kernel: exit 1."""
    pytest.importorskip("triton")
    monkeypatch.setattr(bc, "DEVICE", "cpu")
    monkeypatch.setattr(bc, "cuda_problem", lambda: None)
    monkeypatch.setattr(bc, "cuda_timer", lambda: CountingTimer())
    monkeypatch.setattr(bc, "device_name", lambda: "stand-in")
    monkeypatch.setattr(bc, "issue_op_cases", lambda: TINY[:1])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # no inductor build in a unit test
    out = tmp_path / "bench.json"
    assert bc.main(["--sections", "ops", "--dtypes", "fp32", "--json-out", str(out), "-q"]) == 0
    table = capsys.readouterr().out
    data = json.loads(out.read_text())
    variants = [r["variant"] for r in data["rows"]]
    assert variants == [
        "official eager",
        "torch.compile(official)",
        "ours, torch reference",
        "ours, Triton",
        "ours, Triton row reuse (candidate)",
    ]
    assert all(r["status"] == "ok" for r in data["rows"]) and data["env"]["device"] == "stand-in"
    assert "## ops" in table and "involution tiny" in table

    real = bc.ours_op
    monkeypatch.setattr(bc, "ours_op", lambda case, triton, tf32: lambda *a: real(case, False, tf32)(*a) + 1)
    assert bc.main(["--sections", "ops", "--dtypes", "fp32", "-q"]) == 1
    assert "wrong" in capsys.readouterr().err


def test_peaks_report_copy_bandwidth_and_matmul_throughput():
    timer = CountingTimer(ms=0.5)
    rows, peaks = bc.run_peaks("cpu", timer, bc.Deadline(600), copy_mib=1, n=64)
    assert [(r.variant, r.dtype) for r in rows] == [
        ("dst.copy_(src)", "fp32"),
        ("torch.mm", "fp32"),
        ("torch.mm", "tf32"),
        ("torch.mm", "fp16"),
        ("torch.mm", "bf16"),
    ]
    assert all(r.status == "ok" for r in rows), [(r.dtype, r.note) for r in rows]
    assert peaks["copy_gbps"] == pytest.approx(2 * 2**20 / 0.5e-3 / 1e9)  # 1 MiB read + written in 0.5 ms
    assert peaks["matmul_bf16_tflops"] == pytest.approx(2 * 64**3 / 0.5e-3 / 1e12)
    assert set(peaks) == {"copy_gbps", *(f"matmul_{m}_tflops" for m in ("fp32", "tf32", "fp16", "bf16"))}
