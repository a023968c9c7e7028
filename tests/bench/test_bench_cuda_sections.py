"""The measured sections of ``attn-export bench --device cuda`` on the CPU with tiny shapes: the op
section end to end (official forms, our torch references and our Triton kernels in the interpreter)
with a stand-in timer, the block section with the official weights, the detector section, and the
peaks."""

from __future__ import annotations

import pytest
from cuda_stand_ins import PEAKS, TINY, CountingTimer

from attn_export.bench import cuda_env, cuda_sections
from attn_export.bench.measure import Deadline, failed


def test_op_cost_counts_minimal_bytes_and_flops():
    case = cuda_sections.OpCase("involution", "t", 1, 4, 5, 5, 3, 1, 2)  # 5x5 out, k=3, G=2
    nbytes, flops = cuda_sections.op_cost(case, 4)
    assert nbytes == (100 + 2 * 9 * 25 + 100) * 4 and flops == 2 * 100 * 9
    conv = cuda_sections.OpCase("dynamic_conv", "t", 2, 4, 6, 6, 3, 1, 2, 8)  # 6x6 out, Cin/g = 2
    assert cuda_sections.op_cost(conv, 2) == ((2 * 4 * 36 + 2 * 8 * 2 * 9 + 2 * 8 * 36) * 2, 2.0 * 2 * 8 * 36 * 2 * 9)


def test_the_op_section_runs_every_variant_and_gates_it():
    pytest.importorskip("triton")
    timer = CountingTimer()
    rows = cuda_sections.run_ops(TINY, ["fp32"], "cpu", timer, Deadline(600), PEAKS, compile_dtypes=())
    expected = []
    for c in TINY:
        expected += [(c.label, v) for v in ("official eager", "ours, torch reference", "ours, Triton")]
        if c.op == "involution":
            expected.append((c.label, "ours, Triton tiles (TensorRT plugin)"))
    assert [(r.name, r.variant) for r in rows] == expected
    assert all(r.status == "ok" for r in rows), [(r.name, r.variant, r.note) for r in rows]
    assert timer.calls == len(rows)
    assert {r.metric for r in rows if r.name.startswith("dynamic_conv")} == {"TFLOP/s"}
    assert {r.metric for r in rows if not r.name.startswith("dynamic_conv")} == {"GB/s"}
    assert all(r.fraction is not None and r.rel_err is not None for r in rows)


def test_a_wrong_kernel_in_the_op_section_is_reported_and_not_timed(monkeypatch):
    pytest.importorskip("triton")
    real = cuda_sections.ours_op

    def broken(case, triton, tf32):
        fn = real(case, triton, tf32)
        return (lambda *a: fn(*a) * 1.01) if triton is True else fn

    monkeypatch.setattr(cuda_sections, "ours_op", broken)
    timer = CountingTimer()
    rows = cuda_sections.run_ops(TINY[:1], ["fp32"], "cpu", timer, Deadline(600), PEAKS, compile_dtypes=())
    wrong = [r for r in rows if r.status == "wrong"]
    assert [r.variant for r in wrong] == ["ours, Triton"] and wrong[0].ms is None
    assert timer.calls == len(rows) - 1
    assert failed(rows) == wrong


def test_the_block_section_adapts_the_official_weights_and_gates_every_variant():
    timer = CountingTimer()
    names = ["involution", "odconv", "outlook", "skconv"]
    rows = cuda_sections.run_blocks(
        names, ["fp32"], "cpu", timer, Deadline(600), batch=2, channels=32, size=9, compile_dtypes=()
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
    rows = cuda_sections.run_detector(ckpt, "cpu", timer, Deadline(600), batches=(1,), modes=("eager", "ort"))
    eager = [r for r in rows if r.variant == "torch eager"]
    assert len(eager) == 1 and eager[0].status == "ok"
    assert eager[0].metric == "images/s" and eager[0].value == pytest.approx(250.0)
    ort = [r for r in rows if r.variant == "onnxruntime CUDA"]
    assert len(ort) == 1 and ort[0].status in ("ok", "unavailable")
    missing = cuda_sections.run_detector(tmp_path / "nope.pt", "cpu", timer, Deadline(600), batches=(1,))
    assert [r.status for r in missing] == ["error"] and "no such file" in missing[0].note


def test_peaks_report_copy_bandwidth_and_matmul_throughput():
    timer = CountingTimer(ms=0.5)
    rows, peaks = cuda_env.run_peaks("cpu", timer, Deadline(600), copy_mib=1, n=64)
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
