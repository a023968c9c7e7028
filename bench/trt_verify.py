"""How long ``--target trt`` verification takes, against the onnxruntime verification of the same model.

One run, one model, the same batches: ``export_onnx`` with target ``ort`` (onnxruntime on the portable
graph), with target ``trt`` as it verifies now (onnxruntime, each plugin node by its numpy reference as
an onnxruntime-extensions Python op, the first item of the first batch cross-checked on ONNX's reference
evaluator), and with ``--before`` also target ``trt`` on ONNX's reference evaluator alone (as before).
Each figure is the ``verify`` stage of the export's own timings; the ratios are to the ``ort`` figure.

    python -m attn_export.bench.trt_verify [--model volo_d1_224] [--batches 1,3,5] [--before]

The model is one of the whole-model stand-ins of :mod:`attn_export.bench.upstream_models` (input 3x224x224).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _verify_seconds(model, folder: Path, target: str, batches: list[int], runner: str = "onnxruntime") -> float:
    from attn_export.bench.upstream_models import INPUT_SHAPE
    from attn_export.export import onnx_export

    saved = onnx_export.TRT_VERIFY_RUNNER, dict(onnx_export.VERIFY_BACKENDS)
    onnx_export.TRT_VERIFY_RUNNER = runner
    if runner == "reference":
        onnx_export.VERIFY_BACKENDS["trt"] = "onnx.reference.ReferenceEvaluator with the numpy plugin references"
    try:
        batch = (min(batches), sorted(batches)[len(batches) // 2], max(batches))
        result = onnx_export.export_onnx(
            model, folder / f"{target}-{runner}.onnx", INPUT_SHAPE, batch=batch, target=target, seed=0
        )
    finally:
        onnx_export.TRT_VERIFY_RUNNER, onnx_export.VERIFY_BACKENDS = saved[0], saved[1]
    if not result.ok:
        raise SystemExit(f"{target} ({runner}): verification FAILED\n{result.report.table()}")
    if sorted(result.report.batches) != sorted(batches):
        raise SystemExit(f"{target}: verified batches {result.report.batches}, asked {batches}")
    return result.timings["verify"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="volo_d1_224")
    p.add_argument("--batches", default="1,3,5", help="three batch sizes, as MIN,OPT,MAX")
    p.add_argument("--before", action="store_true", help="also time the reference-evaluator-only verification")
    args = p.parse_args(argv)
    import torch

    from attn_export.bench.upstream_models import build

    torch.set_num_threads(torch.get_num_threads())
    batches = sorted({int(b) for b in args.batches.split(",")})
    model = build(args.model)
    print(f"{args.model} at batches {batches}; CPU: {_cpu()}, torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ort_s = _verify_seconds(model, Path(tmp), "ort", batches)
        rows.append(("ort: onnxruntime, portable graph", ort_s))
        rows.append(("trt: onnxruntime + numpy plugin ops", _verify_seconds(model, Path(tmp), "trt", batches)))
        if args.before:
            before = _verify_seconds(model, Path(tmp), "trt", batches, "reference")
            rows.append(("trt: onnx.reference (before)", before))
    print(f"{'verification':<40} {'seconds':>8} {'x ort':>7}")
    for name, s in rows:
        print(f"{name:<40} {s:>8.1f} {s / ort_s:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
