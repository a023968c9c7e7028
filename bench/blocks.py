"""``attn-export bench``: time each block in PyTorch and on onnxruntime, side by side.

For every block, at one shape, four variants run on the CPU with the same number of threads:

==============  ===============================================================================
column          what runs
==============  ===============================================================================
official eager  the official-layout reference module (:mod:`attn_export.bench.upstream`) in PyTorch
ours ORT        attn-export's block, exported by :func:`attn_export.export.export_onnx` (standard
                ONNX ops, dynamic batch), on onnxruntime
naive ORT       ``torch.onnx.export`` of the official module as it is (dynamo exporter with a dynamic
                batch first, then the TorchScript exporter with a fixed batch), on onnxruntime
ours eager      attn-export's block in PyTorch
==============  ===============================================================================

Our block gets the official module's weights (through the adapters of
:func:`attn_export.export.adapt.adapt_model`), and before anything is timed each graph's output is
compared with the official module's eager output on the same input, so the table never times a wrong
graph. SKConv is the exception: the common PyTorch port (kernels 3 and 5, ``Linear`` fuse/select
layers) and attn-export's SKConv (dilated 3x3 branches, 1x1 conv fuse/select with BatchNorm, as the
paper and timm) are different functions with no weight mapping, so its "ours" column is our SKConv
with the same width, branches and groups, checked against its own eager output.

The variants run round-robin (every variant of every block once per round, for several rounds) after
a warm-up, and the table shows medians. Everything written (ONNX files) lives in a temporary folder
that is removed at the end. Progress goes to stderr; ``--json`` writes the results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attn_export.bench.machine import busy_warning
from attn_export.bench.machine import fmt_load as _fmt_load
from attn_export.bench.machine import load as _load
from attn_export.bench.machine import machine as _machine
from attn_export.bench.machine import versions as _versions
from attn_export.bench.specs import BLOCKS, Spec, official_and_ours, specs

#: Targets: ours on onnxruntime at most this fraction of the official eager time, per block ...
TARGET_PER_BLOCK = 0.5
#: ... and as the geometric mean over the blocks.
TARGET_GEOMEAN = 0.3
#: Parity tolerance (float32 graphs against float32 eager).
ATOL, RTOL = 1e-4, 1e-3
#: Pause before each timed sample: onnxruntime's and OpenMP's worker threads spin for a while after a
#: call, and would otherwise steal the cores from the next variant in the round.
PAUSE_S = 0.02


# --- helpers ------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters: Python warnings, loggers, and whatever they print to stdout/stderr
    (the TorchScript exporter prints its whole graph to file descriptor 2 when it fails)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    from attn_export.export.torch_export import capture_output

    try:
        with warnings.catch_warnings(), capture_output():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _short(e: BaseException) -> str:
    """The innermost cause of an exception in one line, with the op being translated if any."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    where = ""
    for c in chain:
        m = re.search(r"target=torch\.ops\.([\w.]+)", str(c))
        if m:
            where = f"{m.group(1)}: "
    root = chain[-1]
    lines = [t.strip() for t in str(root).splitlines() if t.strip()]
    text = (lines[0] if lines else "").replace("\x1b[96m", "").replace("\x1b[0m", "")
    text = re.sub(r"<class '[\w.]*?(\w+)'>", r"\1", text)
    return f"{where}{type(root).__name__}: {text}"[:200]


def _max_err(got: np.ndarray, ref: np.ndarray) -> tuple[float, bool]:
    if got.shape != ref.shape:
        return math.inf, False
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    return float(err.max()), bool(np.all(err <= ATOL + RTOL * np.abs(ref)))


@dataclass
class Variant:
    """One timed callable, or why it could not run."""

    fn: Callable[[], object] | None = None
    how: str = ""
    error: str = ""
    parity: float | None = None  # max abs error against the reference output
    samples: list[float] = field(default_factory=list)  # ms per call
    ops: dict[str, int] | None = None  # op counts of an exported graph

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def to_dict(self) -> dict:
        return {
            "how": self.how,
            "error": self.error or None,
            "parity_max_abs": self.parity,
            "median_ms": self.median,
            "min_ms": min(self.samples) if self.samples else None,
            "samples": len(self.samples),
        }


def _naive_export(module, sample, path: Path, batch: int) -> tuple[str, str]:
    """Export the official module as it is; return ``(how, error)`` (error empty on success)."""
    import torch

    errors = []
    try:
        with _quiet():
            prog = torch.onnx.export(
                module,
                (sample,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                opset_version=18,
            )
            prog.save(str(path))
        return "dynamo, dynamic batch", ""
    except Exception as e:
        errors.append(f"dynamo: {_short(e)}")
    try:
        with _quiet():
            torch.onnx.export(module, (sample,), str(path), dynamo=False, opset_version=18)
        return f"TorchScript, batch {batch} (dynamo failed: {errors[0][len('dynamo: ') :]})", ""
    except Exception as e:
        errors.append(f"TorchScript: {_short(e)}")
    return "", "; ".join(errors)


def _ort(path: Path, threads: int):
    from attn_export.runtime.runners import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], threads=threads)


def _ort_fn(runner, x: np.ndarray) -> Callable[[], np.ndarray]:
    feeds = {runner.input_names[0]: x}
    return lambda: runner.infer(feeds)[runner.output_names[0]]


def _eager_fn(module, x) -> Callable[[], object]:
    import torch

    def run():
        with torch.inference_mode():
            return module(x)

    return run


def prepare(spec: Spec, batch: int, threads: int, tmp: Path, seed: int) -> dict[str, Variant]:
    """Build, export and parity-check the four variants of one block."""
    import torch

    from attn_export.export import export_onnx

    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal((batch, *spec.input_shape), dtype=np.float32)
    x = torch.from_numpy(x_np)
    # ours: the official weights through the adapters (or our own block where no mapping exists)
    official, ours = official_and_ours(spec, seed, x)
    with torch.inference_mode():
        ref_official = official(x).numpy()
        ref_ours = ours(x).numpy()
    ref = ref_official if spec.ours is None else ref_ours

    v: dict[str, Variant] = {}
    v["official_eager"] = Variant(_eager_fn(official, x), "torch eager", parity=0.0)
    v["ours_eager"] = Variant(_eager_fn(ours, x), "torch eager")
    v["ours_eager"].parity, ok = _max_err(ref_ours, ref)
    if not ok:
        v["ours_eager"] = Variant(error=f"wrong output (max error {v['ours_eager'].parity:.2e})")

    path = tmp / f"{spec.name}.ours.onnx"
    try:
        with _quiet():
            res = export_onnx(ours, path, spec.input_shape, batch=(1, batch, max(batch, 8)), verify=False)
        runner = _ort(res.path, threads)
        fn = _ort_fn(runner, x_np)
        err, ok = _max_err(fn(), ref)
        how = f"export_onnx, dynamic batch, {res.nodes} nodes"
        v["ours_ort"] = Variant(fn, how, parity=err) if ok else Variant(how=how, error=f"wrong output ({err:.2e})")
        v["ours_ort"].ops = res.ops
    except Exception as e:
        v["ours_ort"] = Variant(error=f"fails: {_short(e)}")

    path = tmp / f"{spec.name}.naive.onnx"
    how, error = _naive_export(copy.deepcopy(official), x, path, batch)  # a copy of the module in eval mode
    if error:
        v["naive_ort"] = Variant(error=f"fails: {error}")
    else:
        try:
            runner = _ort(path, threads)
            fn = _ort_fn(runner, x_np)
            err, ok = _max_err(fn(), ref_official)
            v["naive_ort"] = Variant(fn, how, parity=err) if ok else Variant(how=how, error=f"wrong output ({err:.2e})")
        except Exception as e:
            v["naive_ort"] = Variant(how=how, error=f"fails on onnxruntime: {_short(e)}")
    return v


def time_all(table: dict[str, dict[str, Variant]], rounds: int, warmup: int, min_sample_s: float) -> None:
    """Round-robin timing: each round runs every variant of every block once (``reps`` calls each)."""
    live = [(b, n, var) for b, vs in table.items() for n, var in vs.items() if var.fn is not None]
    reps = {}
    for b, n, var in live:
        for _ in range(warmup):
            var.fn()
        t0 = time.perf_counter()
        var.fn()
        once = time.perf_counter() - t0
        reps[(b, n)] = max(1, min(50, math.ceil(min_sample_s / max(once, 1e-6))))
    for r in range(rounds):
        for b, n, var in live:
            k = reps[(b, n)]
            time.sleep(PAUSE_S)  # let the previous variant's spinning worker threads go idle
            t0 = time.perf_counter()
            for _ in range(k):
                var.fn()
            var.samples.append((time.perf_counter() - t0) / k * 1e3)
        _say(f"round {r + 1}/{rounds} done")


# --- report -------------------------------------------------------------------------------------------
COLUMNS = ("official_eager", "ours_ort", "naive_ort", "ours_eager")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(table: dict[str, dict[str, Variant]]) -> dict:
    blocks = {}
    ratios = []
    for name, vs in table.items():
        ours, off, naive = (vs[k].median for k in ("ours_ort", "official_eager", "naive_ort"))
        r_off, r_naive = _ratio(ours, off), _ratio(ours, naive)
        if r_off is not None:
            ratios.append(r_off)
        blocks[name] = {
            "variants": {k: vs[k].to_dict() for k in COLUMNS},
            "ours_ort_over_official_eager": r_off,
            "ours_ort_over_naive_ort": r_naive,
            "target_per_block_met": None if r_off is None else r_off <= TARGET_PER_BLOCK,
            "target_not_slower_than_naive_met": None if r_naive is None else r_naive <= 1.0,
        }
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios and len(ratios) == len(table) else None
    return {
        "blocks": blocks,
        "geomean_ours_ort_over_official_eager": geo,
        "target_geomean_met": None if geo is None else geo <= TARGET_GEOMEAN,
        "targets": {"per_block": TARGET_PER_BLOCK, "geomean": TARGET_GEOMEAN, "not_slower_than_naive": 1.0},
    }


def _fmt_ms(v: Variant) -> str:
    return f"{v.median:.2f}" if v.median is not None else "-"


def _fmt_ratio(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "n/a"


def render(table: dict[str, dict[str, Variant]], summary: dict, env: dict, spec_map: dict[str, Spec]) -> str:
    lines = [
        f"attn-export bench: batch {env['batch']}, {env['threads']} thread(s), {env['rounds']} rounds, "
        f"medians in ms per call",
        f"{env['versions']}",
        f"{env['machine']}; 1-min load average {_fmt_load(env['load_average_1min'])} "
        "(other processes on the cores distort the timings, PyTorch eager's the most)",
        "",
    ]
    head = (
        f"{'block':<11} {'official eager':>14} {'ours ORT':>9} {'naive ORT':>10} {'ours eager':>10} "
        f"{'ours/official':>13} {'ours/naive':>10}"
    )
    lines += [head, "-" * len(head)]
    for name, vs in table.items():
        s = summary["blocks"][name]
        lines.append(
            f"{name:<11} {_fmt_ms(vs['official_eager']):>14} {_fmt_ms(vs['ours_ort']):>9} "
            f"{_fmt_ms(vs['naive_ort']):>10} {_fmt_ms(vs['ours_eager']):>10} "
            f"{_fmt_ratio(s['ours_ort_over_official_eager']):>13} {_fmt_ratio(s['ours_ort_over_naive_ort']):>10}"
        )
    geo = summary["geomean_ours_ort_over_official_eager"]
    lines.append(f"{'geomean':<11} {'':>14} {'':>9} {'':>10} {'':>10} {_fmt_ratio(geo):>13}")
    lines += ["", "fastest sample of each variant (ms; less sensitive to other load than the medians):"]
    for name, vs in table.items():
        mins = [f"{min(vs[k].samples):.2f}" if vs[k].samples else "-" for k in COLUMNS]
        lines.append(f"{name:<11} {mins[0]:>14} {mins[1]:>9} {mins[2]:>10} {mins[3]:>10}")
    lines += ["", "blocks:"]
    for name, vs in table.items():
        lines.append(f"  {name:<11} {spec_map[name].config}")
        if spec_map[name].note:
            lines.append(f"  {'':<11} note: {spec_map[name].note}")
        for k in ("ours_ort", "naive_ort"):
            var = vs[k]
            label = "ours ORT " if k == "ours_ort" else "naive ORT"
            state = var.error or f"{var.how}; parity max abs {var.parity:.1e}"
            lines.append(f"  {'':<11} {label}: {state}")
    lines += ["", "targets:"]
    for name in table:
        s = summary["blocks"][name]
        per = s["target_per_block_met"]
        naive = s["target_not_slower_than_naive_met"]
        lines.append(
            f"  {name:<11} ours ORT <= {TARGET_PER_BLOCK}x official eager: {_met(per)}; "
            f"not slower than naive export: {_met(naive, 'n/a (the naive export does not run)')}"
        )
    lines.append(
        f"  geomean of ours ORT / official eager <= {TARGET_GEOMEAN}x: {_met(summary['target_geomean_met'], 'n/a')}"
    )
    if env.get("busy"):
        lines.append(f"warning: {env['busy']}")
    return "\n".join(lines)


def _met(flag: bool | None, missing: str = "n/a") -> str:
    return missing if flag is None else ("met" if flag else "NOT met")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export bench",
        description="Time each block: the official module in PyTorch eager, our block exported to ONNX on "
        "onnxruntime, the naive torch.onnx export of the official module on onnxruntime, and our block "
        "in PyTorch eager (CPU). `attn-export bench MODEL.pt` times a whole model instead "
        "(`attn-export bench MODEL.pt --help`).",
    )
    p.add_argument(
        "--blocks",
        nargs="+",
        default=list(BLOCKS),
        metavar="BLOCK",
        help=f"blocks to time, space or comma separated (default: all of {', '.join(BLOCKS)})",
    )
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--channels", type=int, default=64, help="channels (default 64)")
    p.add_argument("--size", type=int, default=40, help="height and width (default 40)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, default=15, help="round-robin rounds (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per variant first (default 3)")
    p.add_argument(
        "--min-sample", type=float, default=0.02, help="seconds one timed sample spans at least (default 0.02)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default 0)")
    p.add_argument("--json", action="store_true", help="write the results as JSON to stdout")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu (this benchmark) or cuda: the GPU benchmark, `attn-export bench --device cuda --help`",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and not argv[0].startswith("-"):  # attn-export bench MODEL.pt: a whole model
        from attn_export.bench.model_bench import main as model_main

        return model_main(argv)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="cpu")
    if device.parse_known_args(argv)[0].device != "cpu":  # the GPU benchmark: its own module and flags
        from attn_export.bench.cuda import main as cuda_main

        return cuda_main(argv)
    args = parser().parse_args(argv)
    names = [n.strip() for item in args.blocks for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        print(f"attn-export bench: error: unknown block(s) {unknown}; choose from {', '.join(BLOCKS)}", file=sys.stderr)
        return 2
    for flag in ("batch", "channels", "size", "threads", "rounds"):
        if getattr(args, flag) < 1:
            print(f"attn-export bench: error: --{flag} must be >= 1", file=sys.stderr)
            return 2
    names = [n for n in BLOCKS if n in names]

    import torch

    torch.set_num_threads(args.threads)
    load_start = _load()
    spec_map = specs(args.channels, args.size)
    table: dict[str, dict[str, Variant]] = {}
    with tempfile.TemporaryDirectory(prefix="attn-export-bench-") as tmp:
        for i, name in enumerate(names):
            _say(f"preparing {name}: exports and parity checks")
            try:
                table[name] = prepare(spec_map[name], args.batch, args.threads, Path(tmp), args.seed + i)
            except Exception as e:
                print(f"attn-export bench: error: {name}: {_short(e)}", file=sys.stderr)
                return 1
            for k in COLUMNS:
                var = table[name][k]
                if var.error:
                    _say(f"  {k}: {var.error}")
        _say(f"timing: {args.rounds} rounds, {args.threads} thread(s)")
        time_all(table, args.rounds, args.warmup, args.min_sample)

    summary = summarize(table)
    env = {
        "batch": args.batch,
        "channels": args.channels,
        "size": args.size,
        "threads": args.threads,
        "rounds": args.rounds,
        "versions": _versions(),
        "machine": _machine(),
        "load_average_1min": {"start": load_start, "end": _load()},
    }
    env["busy"] = busy_warning(env["load_average_1min"], args.threads)
    if args.json:
        out = {"env": env, **summary, "configs": {n: spec_map[n].config for n in names}}
        for n in names:
            out["blocks"][n]["ours_ort_ops"] = table[n]["ours_ort"].ops
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(render(table, summary, env, spec_map))
    return 0


if __name__ == "__main__":
    sys.exit(main())
