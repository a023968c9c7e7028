"""The ``attn-export`` command line.

``attn-export MODEL.pt [options]`` exports a model to ONNX and verifies it (the main job);
``attn-export demo`` writes the demo checkpoint and exports it; ``attn-export bench`` times the
blocks. Heavy modules (torch, onnx, onnxruntime) are imported only once a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from attn_export._version import __version__

SUBCOMMANDS = ("demo", "bench", "kernels", "serve", "data", "train", "evaluate", "triton")
log = logging.getLogger("attn_export")


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _unexpected(stage: str, e: BaseException) -> int:
    """An error nobody planned for: one line naming the stage (the traceback with -v), exit 2."""
    lines = [t.strip() for t in str(e).splitlines() if t.strip()]
    log.debug("unexpected error in stage %s", stage, exc_info=e)
    print(
        f"attn-export: error: {stage}: unexpected {type(e).__name__}: {lines[0][:300] if lines else ''} "
        "(rerun with -v for the traceback)",
        file=sys.stderr,
    )
    return 2


def _progress(stage: str, message: str) -> None:
    log.info("%-8s %s", f"[{stage}]", message)


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export",
        description="Export a PyTorch model with dynamic-kernel attention blocks to ONNX and verify it "
        "against PyTorch.",
        epilog="Other commands: serve (the detection service), triton (a Triton Inference Server model repository, and "
        "'triton serve' to run it), data / train / evaluate (the synthetic shapes "
        "detector), demo (write and export the demo model), bench (time the blocks), kernels (what the "
        "Triton kernels compile to, on the CPU). "
        "Run 'attn-export COMMAND --help' for theirs.",
    )
    p.add_argument(
        "model", type=Path, help="checkpoint: the attn-export format, or a pickled nn.Module (needs --trust-checkpoint)"
    )
    p.add_argument("-o", "--output", type=Path, help="output .onnx (default: next to MODEL, .onnx)")
    p.add_argument("--input-shape", help="input shape without the batch, e.g. 3,320,320 (default: from the checkpoint)")
    p.add_argument(
        "--input",
        action="append",
        metavar="NAME:C,H,W",
        help="a named tensor input and its shape without the batch; repeat it for a model of several inputs "
        "(passed to forward by name where the names are its parameters, else in the order given)",
    )
    p.add_argument(
        "--dynamic-hw",
        metavar="MIN:OPT:MAX",
        help="make the image input's height and width dynamic too (both sides range over MIN..MAX); verified at "
        "MIN, OPT, MAX, an odd and a non-square size. A model that cannot take a free size (a fixed position "
        "embedding, a flatten into a fixed Linear) keeps its size, and the export says why",
    )
    p.add_argument(
        "--batch",
        default="1:1:32",
        help="MIN:OPT:MAX batch sizes for profiles and verification (default 1:1:32; the ONNX graph accepts any batch)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the minimum)")
    p.add_argument(
        "--target",
        choices=("ort", "trt"),
        default=None,
        help="ort: standard ONNX ops only (default; trt with --trt); trt: each dynamic kernel as one TensorRT "
        "plugin node, verified on ONNX's reference evaluator (batches capped at 8)",
    )
    p.add_argument(
        "--trt",
        action="store_true",
        help="also build a TensorRT engine next to the ONNX graph "
        "(implies --target trt unless --target is given; needs TensorRT >= 10.6 and an NVIDIA GPU)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="build the TensorRT engine in FP16, the values that cannot live in FP16 kept in FP32 (with --trt)",
    )
    p.add_argument("--bf16", action="store_true", help="the same in BF16 (with --trt; not with --fp16)")
    p.add_argument("--workspace", type=float, default=None, help="TensorRT workspace limit in GiB (with --trt)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison against PyTorch")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--seed", type=int, help="seed for the verification inputs (default: fresh each run)")
    p.add_argument("--report", type=Path, help="write the export and verification report as JSON here")
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="allow loading a pickled model, which runs code from the file"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and the result")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug output: what torch printed while exporting (e.g. its FX graph dumps on a failure) and tracebacks",
    )
    p.add_argument("--version", action="version", version=f"attn-export {__version__}")
    return p


def _versions() -> str:
    import onnx
    import onnxruntime
    import torch

    return (
        f"attn-export {__version__} | torch {torch.__version__} | onnx {onnx.__version__} | "
        f"onnxruntime {onnxruntime.__version__}"
    )


def _write_report(path: Path, data: dict) -> None:
    """The JSON report, and beside it the same for people: ``R.md`` and ``R.html`` (each written atomically)."""
    from attn_export.export.report_page import write_report

    for written in write_report(path, data)[1:]:
        log.info("report page: %s", written)


def _export_metadata(loaded, shape) -> dict:
    """What the service reads from the graph: class names, and for a YOLO ``Detect`` its head and stride."""
    from attn_export.detection.loader import export_metadata

    try:
        return export_metadata(loaded.model, loaded.meta, shape)
    except Exception:  # a nicety: never the reason an export fails
        return {"classes": loaded.meta.get("classes")}


def run_export(args: argparse.Namespace) -> int:
    from attn_export.export import ExportError, export_onnx, load_model
    from attn_export.export.checkpoint import parse_inputs, parse_shape
    from attn_export.export.profile import parse_batch, parse_hw

    t0 = time.perf_counter()
    stage = "arguments"
    try:
        if args.target is None:
            args.target = "trt" if args.trt else "ort"
        if (args.fp16 or args.bf16 or args.workspace) and not args.trt:
            raise ExportError("--fp16, --bf16 and --workspace apply to TensorRT engines: add --trt")
        if args.fp16 and args.bf16:
            raise ExportError("--fp16 and --bf16: choose one half precision")
        batch = parse_batch(args.batch)
        hw = parse_hw(args.dynamic_hw) if args.dynamic_hw else None
        inputs = parse_inputs(args.input) if args.input else None
        if inputs and args.input_shape:
            raise ExportError("--input and --input-shape: give the shapes one way (--input NAME:C,H,W, repeatable)")
        output = args.output or args.model.with_suffix(".onnx")
        log.info(_versions())
        stage = "load"
        with _timed("load") as done, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_model(args.model, trust_checkpoint=args.trust_checkpoint)
            for w in caught:  # torch.load's notes (unpickling, changed sources): with -v only
                log.debug("warning: %s: %s", w.category.__name__, w.message)
            shape = parse_shape(args.input_shape) if args.input_shape else loaded.input_shape
            if inputs:
                shape = next(iter(inputs.values()))
            if not shape:
                raise ExportError(f"{args.model}: the checkpoint holds no input shape; pass --input-shape C,H,W")
            shown = (
                ", ".join(f"{n} (batch, {', '.join(map(str, s))})" for n, s in inputs.items())
                if inputs
                else f"(batch, {', '.join(map(str, shape))})"
            )
            done(f"{args.model} ({loaded.source}, {loaded.arch}), input {shown}")
        stage = "export"  # export_onnx names its own stages
        result = export_onnx(
            loaded.model,
            output,
            shape,
            batch=batch,
            opset=args.opset,
            target=args.target,
            verify=not args.no_verify,
            atol=args.atol,
            rtol=args.rtol,
            seed=args.seed,
            progress=_progress,
            metadata=_export_metadata(loaded, shape),
            dynamic_hw=hw,
            inputs=inputs,
        )
    except ExportError as e:
        log.debug("traceback", exc_info=e)
        print(f"attn-export: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        return _unexpected(stage, e)
    if result.report is not None:
        print(result.report.table())
    if args.report:
        _write_report(args.report, result.to_dict())
    took = time.perf_counter() - t0
    if not result.ok:
        print(f"attn-export: verification FAILED; no {output} written ({took:.1f}s)", file=sys.stderr)
        return 1
    size = result.size_bytes / 1e6
    dynamic = "dynamic batch"
    if result.dynamic_hw:
        dynamic = f"dynamic batch, height and width {result.dynamic_hw[0]}..{result.dynamic_hw[2]}"
    elif result.hw_refused:
        dynamic = "dynamic batch; height and width static"
    ops = ", ".join(f"{k} {v}" for k, v in result.ops.items())
    print(
        f"exported {result.path} ({size:.2f} MB, {result.nodes} nodes, opset {result.opset}, {dynamic}) in {took:.1f}s"
    )
    print(f"ops: {ops}")
    if result.target == "trt":
        plugins = ", ".join(f"{k} {v}" for k, v in result.plugins.items()) or "none"
        print(f"TensorRT plugin nodes: {plugins}")
    if args.trt:
        return build_trt_engine(args, loaded, shape, batch, result)
    return 0


def build_trt_engine(args: argparse.Namespace, loaded, shape, batch, result) -> int:
    """``--trt``: build the engine from the verified graph and check it against PyTorch.

    Where TensorRT or a GPU is missing, say what is missing and how to build the engine elsewhere
    (exit 3); the verified graph is already written.
    """
    from attn_export.export import ExportError, trt_build
    from attn_export.export.profile import rounded_hw

    engine = result.path.with_suffix(".engine")
    # one profile over batch, height and width where the graph has them free (in the multiples of the
    # model's stride where it needs them: the range the export verified)
    multiple = getattr(result, "hw_multiple", 1)
    hw = rounded_hw(result.dynamic_hw, multiple) if result.dynamic_hw else None
    run_shape = (shape[0], hw[1], hw[1]) if hw else shape
    missing = trt_build.check_trt_environment()
    if missing:
        batch_arg = ":".join(map(str, batch))
        fp16 = " --fp16" if args.fp16 else " --bf16" if args.bf16 else ""
        sides = f" --dynamic-hw {':'.join(map(str, hw))}" if hw else ""
        print(f"attn-export: {missing}", file=sys.stderr)
        print(
            f"The verified graph is at {result.path}. To build the engine on a machine with an NVIDIA GPU and "
            f"TensorRT >= 10.9 (AOT plugins, so the engine runs without Python):\n"
            f"  attn-export {args.model} --trt --batch {batch_arg}{sides}{fp16}\n"
            f"and run it with:\n  {trt_build.trtexec_run_command(engine, result.input_name, run_shape, batch[1])}",
            file=sys.stderr,
        )
        if result.target == "ort":
            try:
                cmd = trt_build.trtexec_command(
                    result.path, engine, result.input_name, shape, batch, args.fp16, bf16=args.bf16, dynamic_hw=hw
                )
                print(f"This graph has no plugin nodes, so trtexec alone can build it:\n  {cmd}", file=sys.stderr)
            except ValueError as e:
                print(f"(trtexec: {e})", file=sys.stderr)
        else:
            print(
                "trtexec cannot load the attn-export plugins (they are Python tensorrt.plugin definitions); for "
                "a trtexec-only build, export the plugin-free graph with --target ort and run:\n  "
                + trt_build.trtexec_command(
                    result.path.with_suffix(".ort.onnx"),
                    engine,
                    result.input_name,
                    shape,
                    batch,
                    False,
                    tensorrt_major=10,
                    dynamic_hw=hw,
                ),
                file=sys.stderr,
            )
        return 3
    try:
        classes = loaded.meta.get("classes") if isinstance(loaded.meta, dict) else None
        kwargs = {"workspace_gb": args.workspace} if args.workspace else {}
        built = trt_build.build_engine(
            result.path,
            engine,
            result.input_name,
            shape,
            batch,
            fp16=args.fp16,
            bf16=args.bf16,
            progress=_progress,
            classes=classes,
            dynamic_hw=hw,
            hw_multiple=multiple,
            **kwargs,
        )
        from attn_export.runtime.trt_runner import TensorRTRunner

        runner = TensorRTRunner(built.engine_path)
        batches = result.report.batches if result.report else sorted(set(batch))
        # half-precision tolerances (bf16 keeps 8 bits of mantissa, fp16 11): see docs/precision.md
        half_tol = 5e-2 if args.bf16 else 1e-2 if args.fp16 else 0.0
        atol, rtol = max(args.atol, half_tol), max(args.rtol, half_tol)
        report = trt_build.verify_engine(
            loaded.model,
            runner,
            result.input_name,
            shape,
            batches,
            result.output_names,
            atol,
            rtol,
            args.seed,
            dynamic_hw=hw,
            hw_multiple=multiple,
        )
    except ExportError as e:
        print(f"attn-export: error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    print(
        f"engine {built.engine_path} ({built.size_bytes / 1e6:.2f} MB, {built.precision}, plugins "
        f"{built.plugin_mode or 'none'}) in {built.seconds:.1f}s; metadata {built.metadata_path}"
    )
    return 0 if report.passed else 1


class _timed:
    """Context manager that reports a stage's message with its duration."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.message = ""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self._set

    def _set(self, message: str) -> None:
        self.message = message

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            _progress(self.stage, f"{self.message} ({time.perf_counter() - self.t0:.1f}s)")


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export demo",
        description="Write the demo checkpoint (a small "
        "network using all five blocks) and export it, verified, to ONNX.",
    )
    p.add_argument("--out", type=Path, default=Path("out"), help="folder for the checkpoint and the ONNX model")
    p.add_argument("--seed", type=int, default=0, help="seed for the demo weights")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from attn_export.blocks.mixnet import MixedNet
    from attn_export.export import save_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = MixedNet(num_classes=10)
    ckpt = save_checkpoint(
        args.out / "mixednet.pt",
        model,
        "MixedNet",
        {"num_classes": 10},
        (3, 64, 64),
        meta={"note": "demo weights, seeded random init"},
    )
    _progress("demo", f"wrote {ckpt}")
    return main(
        [str(ckpt), "--batch", "1:4:16", "--report", str(args.out / "mixednet.report.json")]
        + (["-q"] if args.quiet else [])
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
        if cmd == "demo":
            args = demo_parser().parse_args(rest)
            _setup_logging(args.quiet)
            return run_demo(args)
        if cmd == "serve":
            from attn_export.serve.cli import main as serve_main

            return serve_main(rest)
        if cmd == "triton":
            from attn_export.triton_server.repository import main as triton_main

            return triton_main(rest)
        if cmd == "data":
            from attn_export.shapes.data_cli import main as data_main

            return data_main(rest)
        if cmd == "train":
            from attn_export.shapes.train import main as train_main

            return train_main(rest)
        if cmd == "evaluate":
            from attn_export.shapes.evaluate import main as evaluate_main

            return evaluate_main(rest)
        if cmd == "kernels":
            from attn_export.bench.kernels import main as kernels_main

            return kernels_main(rest)
        from attn_export.bench.blocks import main as bench_main

        return bench_main(rest)
    args = export_parser().parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    return run_export(args)


if __name__ == "__main__":
    sys.exit(main())
