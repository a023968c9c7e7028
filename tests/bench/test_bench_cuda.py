"""``attn-export bench --device cuda``: its pure logic, on the CPU with tiny shapes.

The timings themselves need a GPU (``scripts/gpu_check.sh``); here: no CUDA gives a clear error and
exit 3, the correctness gate never times a wrong variant, the op section runs end to end (official
forms, our torch references and our Triton kernels in the interpreter) with a stand-in timer, and the
table and JSON carry every row.
"""

from __future__ import annotations

import json

import pytest
import torch
from cuda_stand_ins import TINY, CountingTimer

from attn_export.bench import cuda as bc
from attn_export.bench import cuda_sections
from attn_export.bench.measure import Row, failed


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


def test_table_and_json_carry_every_row():
    rows = [
        Row("peaks", "copy 1024 MiB", "dst.copy_(src)", "fp32", ms=0.5, metric="GB/s", value=4300.0),
        Row("ops", "outlook B32", "official eager", "fp16", ms=0.25),
        Row("ops", "outlook B32", "ours, Triton", "fp16", ms=0.1, metric="GB/s", value=1800.0, fraction=0.42),
        Row("ops", "outlook B32", "ours, torch reference", "bf16", "wrong", rel_err=0.5, note="wrong output"),
        Row("detector", "d.pt batch 1", "onnxruntime CUDA", "fp32", "unavailable", note="no CUDA provider"),
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
    assert [r.variant for r in failed(rows)] == ["ours, torch reference"]


def test_rows_of_two_passes_are_grouped_for_the_table():
    rows = [
        Row("ops", "b", "official eager", "fp32"),
        Row("ops", "b", "ours, Triton", "fp32"),
        Row("ops", "b", "official eager", "fp16"),
        Row("blocks", "gsop", "official eager", "fp32"),
        Row("peaks", "copy", "dst.copy_(src)", "fp32"),
        Row("ops", "b", "torch.compile(official)", "fp32"),  # pass 2
        Row("ops", "b", "torch.compile(official)", "fp16"),
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
    monkeypatch.setattr(bc, "op_cases", lambda: TINY[:1])
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
        "ours, Triton tiles (TensorRT plugin)",
    ]
    assert all(r["status"] == "ok" for r in data["rows"]) and data["env"]["device"] == "stand-in"
    assert "## ops" in table and "involution tiny" in table

    real = cuda_sections.ours_op
    monkeypatch.setattr(cuda_sections, "ours_op", lambda case, triton, tf32: lambda *a: real(case, False, tf32)(*a) + 1)
    assert bc.main(["--sections", "ops", "--dtypes", "fp32", "-q"]) == 1
    assert "wrong" in capsys.readouterr().err
