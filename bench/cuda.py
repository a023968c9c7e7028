"""``attn-export bench --device cuda``: the GPU figures of the ops, the blocks and the detector in one command.

Sections, in this order (a time budget, ``--budget-s``, skips what is left once spent, and says so):

``peaks``
    What the card does in this very run (:mod:`attn_export.bench.cuda_env`): copy bandwidth and matmul
    throughput. The other sections are reported against these.
``ops``, ``blocks``, ``detector``
    The three dynamic kernels, the five blocks (official-layout module against ours) and the shipped
    detector's images/s at batch 1, 32 and 128 (:mod:`attn_export.bench.cuda_sections`).

Every variant is checked before it is timed (:mod:`attn_export.bench.measure`); a variant that fails is
reported as wrong and never timed, and the command then exits 1. Without CUDA it exits 3 and says so.

Output: a table on stdout (``--json``: the JSON instead), and ``--json-out PATH`` writes the JSON too.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from attn_export.bench.cuda_env import cuda_problem, device_name, run_peaks, versions
from attn_export.bench.cuda_sections import op_cases, run_blocks, run_detector, run_ops
from attn_export.bench.measure import BLOCK_REL_TOL, DTYPES, REL_TOL, Deadline, Row, cuda_timer, failed
from attn_export.bench.specs import BLOCKS
from attn_export.files import write_text

#: Exit status when no CUDA device is visible (as ``--trt`` without TensorRT).
EXIT_NO_CUDA = 3
SECTIONS = ("peaks", "ops", "blocks", "detector")
DEFAULT_BUDGET_S = 170.0
#: The device the command measures (the tests run its logic on "cpu").
DEVICE = "cuda"


# ------------------------------------------------------------------------------------------ output
def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(result: dict) -> str:
    """The results as text tables, one per section."""
    env = result["env"]
    lines = [f"attn-export bench --device cuda | {env.get('device', '?')} | {env.get('versions', '')}"]
    rows = [Row(**r) for r in result["rows"]]
    for section in SECTIONS:
        sec = [r for r in rows if r.section == section]
        if not sec:
            continue
        lines += ["", f"## {section}", ""]
        head = ("case", "variant", "dtype", "ms", "rate", "of peak", "x official")
        lines.append("| {:<40} | {:<30} | {:<10} | {:>9} | {:>16} | {:>7} | {:>10} | note |".format(*head))
        lines.append("|" + "|".join("-" * (n + 2) for n in (40, 30, 10, 9, 16, 7, 10, 4)) + "|")
        for r in sec:
            rate = f"{r.value:,.1f} {r.metric}" if r.value is not None else "-"
            frac = f"{100 * r.fraction:.1f}%" if r.fraction is not None else "-"
            speed = f"{r.speedup:.2f}x" if r.speedup is not None else "-"
            note = r.note if r.status == "ok" else f"{r.status.upper()}: {r.note}"
            cells = (r.name, r.variant, r.dtype, _fmt(r.ms, ".3f"), rate, frac, speed, note)
            lines.append("| {:<40} | {:<30} | {:<10} | {:>9} | {:>16} | {:>7} | {:>10} | {} |".format(*cells))
    lines += ["", f"total {env.get('elapsed_s', 0):.0f} s (budget {env.get('budget_s')} s)"]
    return "\n".join(lines)


VARIANT_ORDER = (
    "official eager",
    "torch.compile(official)",
    "ours, torch reference",
    "ours, Triton",
    "ours, Triton tiles (TensorRT plugin)",
    "ours, CUDA op kernels",
    "ours, torch reference kernels",
    "torch eager",
    "torch.compile reduce-overhead",
    "onnxruntime CUDA",
)


def ordered(rows: Sequence[Row]) -> list[Row]:
    """Rows grouped for the table: by section, case and dtype (first appearance), then variant."""
    first: dict = {}
    for i, r in enumerate(rows):
        first.setdefault(("name", r.section, r.name), i)
        first.setdefault(("dtype", r.dtype), i)

    def key(r: Row):
        variant = VARIANT_ORDER.index(r.variant) if r.variant in VARIANT_ORDER else len(VARIANT_ORDER)
        section = SECTIONS.index(r.section) if r.section in SECTIONS else len(SECTIONS)
        return (section, first[("name", r.section, r.name)], first[("dtype", r.dtype)], variant)

    return sorted(rows, key=key)


def build_result(rows: Sequence[Row], peaks: dict, env: dict) -> dict:
    """The JSON document; each row gets its speed-up over the official eager row of its case and dtype."""
    base = {(r.section, r.name, r.dtype): r.ms for r in rows if r.variant == "official eager" and r.ms}
    for r in rows:
        b = base.get((r.section, r.name, r.dtype))
        r.speedup = b / r.ms if b and r.ms else None
    return {"env": env, "peaks": peaks, "rows": [r.to_dict() for r in rows]}


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export bench --device cuda",
        description="Time the three ops, the five blocks and the shipped detector on a CUDA GPU, each checked "
        "for correctness first, against the copy bandwidth and matmul throughput measured in the same run.",
    )
    p.add_argument("--device", default="cuda", help="cuda (this command); cpu is the ONNX benchmark")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated, of {', '.join(SECTIONS)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma separated, of fp32, fp16, bf16")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time budget in seconds (default 170)")
    p.add_argument("--detector", type=Path, default=Path("models/shapes_detector.pt"), help="detector checkpoint")
    p.add_argument("--json", action="store_true", help="write the JSON to stdout instead of the table")
    p.add_argument("--json-out", type=Path, help="also write the JSON to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [s for s in sections if s not in SECTIONS] + [d for d in dtypes if d not in DTYPES]
    if bad or args.device != "cuda" or args.budget_s <= 0:
        if bad:
            what = f"unknown {bad}"
        elif args.device != "cuda":
            what = f"unknown --device {args.device!r}; choose cpu (the onnxruntime benchmark) or cuda"
        else:
            what = "--budget-s must be > 0"
        print(f"attn-export bench --device cuda: error: {what}", file=sys.stderr)
        return 2
    problem = cuda_problem()
    if problem:
        print(f"attn-export bench --device cuda: error: {problem}", file=sys.stderr)
        return EXIT_NO_CUDA

    import torch

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[bench cuda {time.perf_counter() - deadline.start:5.0f}s] {msg}", file=sys.stderr, flush=True)

    dev = DEVICE
    deadline = Deadline(args.budget_s)
    timer = cuda_timer()
    rows: list[Row] = []
    peaks: dict = {}

    def result() -> dict:
        env = {
            "device": device_name(),
            "versions": versions(),
            "python": platform.python_version(),
            "budget_s": args.budget_s,
            "elapsed_s": round(time.perf_counter() - deadline.start, 1),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "rel_tol": REL_TOL,
            "block_rel_tol": BLOCK_REL_TOL,
        }
        return build_result(ordered(rows), peaks, env)

    def checkpoint() -> None:  # the JSON so far: a run killed from outside still leaves its figures
        if args.json_out:
            write_json(args.json_out, result())

    if "peaks" in sections:
        say("peaks: copy bandwidth, matmul throughput")
        r, peaks = run_peaks(dev, timer, deadline)
        rows += r
        checkpoint()
    cases = op_cases()
    # Pass 1: everything but torch.compile (cheap to start). Pass 2: the compiled variants, most wanted
    # first, while the budget lasts (each compile costs seconds to tens of seconds).
    first, rest = [d for d in dtypes if d == "fp32"], [d for d in dtypes if d != "fp32"]
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("ops", lambda: run_ops(cases, dtypes, dev, timer, deadline, peaks, compile_dtypes=(), say=say)),
        ("blocks", lambda: run_blocks(BLOCKS, dtypes, dev, timer, deadline, compile_dtypes=(), say=say)),
        ("detector", lambda: run_detector(args.detector, dev, timer, deadline, modes=("eager", "ort"), say=say)),
        ("ops", lambda: run_ops(cases, first, dev, timer, deadline, peaks, first, only_compiled=True, say=say)),
        ("detector", lambda: run_detector(args.detector, dev, timer, deadline, modes=("compiled",), say=say)),
        ("ops", lambda: run_ops(cases, rest, dev, timer, deadline, peaks, rest, only_compiled=True, say=say)),
        ("blocks", lambda: run_blocks(BLOCKS, first, dev, timer, deadline, first, only_compiled=True, say=say)),
    ]
    for section, step in steps:
        if section in sections:
            rows += step()
            checkpoint()
    rows = ordered(rows)
    document = result()
    if args.json_out:
        write_json(args.json_out, document)
    print(json.dumps(document, indent=2) if args.json else render(document))
    bad_rows = failed(rows)
    for r in bad_rows:
        print(
            f"attn-export bench --device cuda: {r.status}: {r.section} {r.name} {r.variant} {r.dtype}: {r.note}",
            file=sys.stderr,
        )
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())
