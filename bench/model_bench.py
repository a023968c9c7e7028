"""``attn-export bench MODEL.pt``: a whole model on onnxruntime against the same model in PyTorch eager.

The model is exported by :func:`attn_export.export.export_onnx` (the export's own verification must
pass) into a temporary folder. Then, at each batch asked for, on the CPU and with the same number of
intra-op threads for both:

1. parity gate: the ONNX graph's outputs are compared with the user's model, untouched and in eval mode,
   on fresh random inputs (``|ort - eager| <= atol + rtol |eager|`` everywhere). A batch that fails is
   reported as refused, and nothing is timed at it;
2. timing, interleaved: each round times eager and onnxruntime at every batch once (the order of the
   two alternates between rounds, with a short pause before each sample so the previous run's
   spinning worker threads are idle), for ``--rounds`` rounds or until ``--budget`` seconds are spent;
   the table shows medians and the ratio ORT / eager per batch;
3. onnxruntime's profiler: the heaviest ONNX op types (kernel time per call, share, node count) at each
   batch, from a second session with the same options and profiling on.

Progress goes to stderr; ``--json`` writes every figure to stdout. Exit status: 0 when every batch
passed the parity gate, 1 when one was refused or the export failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: ORT at most this fraction of eager at every batch (issue 19).
TARGET_RATIO = 0.8
#: Parity tolerance, as the export's verification.
ATOL, RTOL = 1e-4, 1e-3
#: Pause before each timed sample (spinning worker threads of the previous variant go idle).
PAUSE_S = 0.02


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class BatchResult:
    """One batch size: the parity check, then the timings (none when the parity check failed)."""

    batch: int
    parity_max_abs: float | None = None
    refused: str = ""  # why the batch was not timed ('' when it was)
    eager_ms: list[float] = field(default_factory=list)
    ort_ms: list[float] = field(default_factory=list)
    ops: list[dict] = field(default_factory=list)  # heaviest op types (profiler)

    @staticmethod
    def _median(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    @property
    def ratio(self) -> float | None:
        e, o = self._median(self.eager_ms), self._median(self.ort_ms)
        return o / e if e and o is not None else None

    @property
    def min_ratio(self) -> float | None:
        return min(self.ort_ms) / min(self.eager_ms) if self.eager_ms and self.ort_ms else None

    def to_dict(self) -> dict:
        r = self.ratio
        return {
            "batch": self.batch,
            "parity_max_abs": self.parity_max_abs,
            "status": "refused" if self.refused else "ok",
            "refused": self.refused or None,
            "eager_ms": self._median(self.eager_ms),
            "ort_ms": self._median(self.ort_ms),
            "ort_over_eager": r,
            "eager_min_ms": min(self.eager_ms) if self.eager_ms else None,
            "ort_min_ms": min(self.ort_ms) if self.ort_ms else None,
            "ort_over_eager_fastest": self.min_ratio,
            "samples": min(len(self.eager_ms), len(self.ort_ms)),
            "target_met": None if r is None else r <= TARGET_RATIO,
            "heaviest_ops": self.ops,
        }


# --- the pieces (module-level so that tests can replace them) ------------------------------------------------
def make_runner(path: Path, threads: int, session_config: dict[str, str] | None = None):
    """The onnxruntime runner the service would use, on the CPU with ``threads`` intra-op threads
    (``session_config``: extra session config entries, e.g. ``session.intra_op.allow_spinning=0``)."""
    from attn_export.runtime.runners import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], threads=threads, session_config=session_config)


def _leaves(out) -> list[np.ndarray]:
    import torch

    return [t.detach().float().cpu().numpy() for t in torch.utils._pytree.tree_leaves(out)]


def parity(
    got: Sequence[np.ndarray], ref: Sequence[np.ndarray], atol: float = ATOL, rtol: float = RTOL
) -> tuple[float, bool]:
    """``(max abs error, every element within atol + rtol |ref|)``; inf and False on a shape or count mismatch."""
    if len(got) != len(ref):
        return math.inf, False
    worst, ok = 0.0, True
    for g, r in zip(got, ref, strict=True):
        if g.shape != r.shape:
            return math.inf, False
        err = np.abs(g.astype(np.float64) - r.astype(np.float64))
        if err.size:
            worst = max(worst, float(np.nan_to_num(err, nan=np.inf).max()))
        ok = ok and bool(np.all(err <= atol + rtol * np.abs(r.astype(np.float64))))
    return worst, ok


def profile_ops(path: Path, runner, feeds: dict[str, np.ndarray], runs: int, tmp: Path, top: int) -> list[dict]:
    """The ``top`` heaviest op types of ``runs`` profiled calls (after one unprofiled-equivalent warm-up call):
    ``{op_type, ms_per_call, share, nodes, in_graph}``, heaviest first. The session copies ``runner``'s options.

    ``in_graph`` is False for the op types onnxruntime makes itself while optimising the session (its fused
    ``FusedConv``/``FusedGemm``, the ``ReorderInput``/``ReorderOutput`` of its NCHWc layout, ...): which
    appear depends on the CPU's instruction set."""
    import onnx
    import onnxruntime as ort

    graph_ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}

    opts = runner.session.get_session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / "ort-profile")
    sess = ort.InferenceSession(str(path), opts, providers=runner.session.get_providers())
    for _ in range(1 + runs):
        sess.run(None, feeds)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink(missing_ok=True)
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = run_starts[1] if len(run_starts) > 1 else -1  # skip the warm-up call
    total: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < after:
            continue
        op = e.get("args", {}).get("op_name", "?")
        total[op] += e["dur"]
        nodes[op].add(e["name"])
    runs_seen = max(1, len(run_starts) - 1) if after >= 0 else max(1, len(run_starts))
    all_us = sum(total.values()) or 1.0
    rows = [
        {
            "op_type": op,
            "ms_per_call": us / runs_seen / 1e3,
            "share": us / all_us,
            "nodes": len(nodes[op]),
            "in_graph": op in graph_ops,
        }
        for op, us in sorted(total.items(), key=lambda kv: -kv[1])
    ]
    return rows[:top]


def time_interleaved(
    pairs: dict[int, tuple[Callable[[], object], Callable[[], object]]],
    results: dict[int, BatchResult],
    rounds: int,
    warmup: int,
    budget_s: float,
    min_sample_s: float,
) -> int:
    """Per round, eager and ORT once at each batch (their order alternating by round); returns the rounds run.

    At least one round runs; later rounds stop when ``budget_s`` is spent."""
    reps = {}
    for b, (eager, ort_fn) in pairs.items():
        for fn in (eager, ort_fn):
            for _ in range(warmup):
                fn()
        t0 = time.perf_counter()
        eager()
        once = time.perf_counter() - t0
        reps[b] = max(1, min(20, math.ceil(min_sample_s / max(once, 1e-6))))
    start = time.perf_counter()
    done = 0
    for r in range(rounds):
        if r and time.perf_counter() - start > budget_s:
            _say(f"time budget of {budget_s:.0f} s spent after {r} round(s)")
            break
        for b, (eager, ort_fn) in pairs.items():
            order = (("eager", eager), ("ort", ort_fn)) if r % 2 == 0 else (("ort", ort_fn), ("eager", eager))
            for kind, fn in order:
                time.sleep(PAUSE_S)
                t0 = time.perf_counter()
                for _ in range(reps[b]):
                    fn()
                ms = (time.perf_counter() - t0) / reps[b] * 1e3
                (results[b].eager_ms if kind == "eager" else results[b].ort_ms).append(ms)
        done += 1
        _say(f"round {r + 1}/{rounds} done")
    return done


# --- the run -------------------------------------------------------------------------------------------------
def run(
    model,
    input_shape: Sequence[int],
    batches: Sequence[int],
    threads: int = 2,
    rounds: int = 7,
    warmup: int = 1,
    budget_s: float = 300.0,
    min_sample_s: float = 0.05,
    top: int = 8,
    profile_runs: int = 2,
    seed: int = 0,
    name: str = "",
    session_config: dict[str, str] | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict:
    """Export ``model``, gate each batch on parity, time the ones that pass, profile; return the results."""
    import torch

    from attn_export.export import export_onnx
    from attn_export.export.errors import ExportError

    torch.set_num_threads(threads)
    model.eval()  # the user's model in eval mode, as the export compares it; never chained
    input_shape = tuple(int(d) for d in input_shape)
    batches = sorted(set(batches))
    out: dict = {
        "model": name or type(model).__name__,
        "class": type(model).__name__,
        "input_shape": list(input_shape),
        "threads": threads,
        "target_ratio": TARGET_RATIO,
        "tolerance": {"atol": atol, "rtol": rtol},
        "session_config": dict(session_config or {}),
    }
    results = {b: BatchResult(b) for b in batches}
    with tempfile.TemporaryDirectory(prefix="attn-export-bench-model-") as tmp_name:
        tmp = Path(tmp_name)
        _say(f"exporting {out['model']} (input {'x'.join(map(str, input_shape))}, batches {batches})")
        t0 = time.perf_counter()
        try:
            res = export_onnx(
                model,
                tmp / "model.onnx",
                input_shape,
                batch=(batches[0], batches[len(batches) // 2], batches[-1]),
                seed=seed,
                atol=atol,
                rtol=rtol,
                progress=lambda stage, msg: None,
            )
        except ExportError as e:
            out["error"] = f"export failed: {e}"
            return out
        out["export"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "nodes": res.nodes,
            "ops": res.ops,
            "adapted": [f"{r.path or '<model>'}: {r.foreign} {r.action}" for r in res.adapted],
            "verification_passed": res.report.passed if res.report else None,
        }
        if not res.ok:
            bad = [c for c in res.report.outputs if not c.passed]
            failed = [f"{c.name} at batch {c.batch}: max abs {c.max_abs:.2e}" for c in bad if c.max_abs is not None]
            block = res.report.first_divergent_block
            where = [f"first divergent block {block}"] if block else []
            out["error"] = "the export's verification failed: " + "; ".join(res.report.problems + failed + where)
            return out
        runner = make_runner(res.path, threads, session_config) if session_config else make_runner(res.path, threads)
        pairs = {}
        feeds_by_batch = {}
        rng = np.random.default_rng(seed)
        for b in batches:
            x_np = rng.standard_normal((b, *input_shape), dtype=np.float32)
            x = torch.from_numpy(x_np)
            feeds = {runner.input_names[0]: x_np}
            with torch.inference_mode():
                ref = _leaves(model(x))
            try:
                got = [runner.infer(feeds)[n] for n in runner.output_names]
            except Exception as e:
                results[b].refused = f"onnxruntime fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            err, ok = parity(got, ref, atol, rtol)
            results[b].parity_max_abs = err
            if not ok:
                results[b].refused = f"wrong output: max abs error {err:.2e} > {atol} + {rtol}|ref|; not timed"
                _say(f"batch {b}: {results[b].refused}")
                continue

            def eager(x=x):
                with torch.inference_mode():
                    return model(x)

            pairs[b] = (eager, lambda feeds=feeds: runner.infer(feeds))
            feeds_by_batch[b] = feeds
        if pairs:
            _say(f"timing batches {list(pairs)}: up to {rounds} rounds, {threads} thread(s)")
            out["rounds"] = time_interleaved(pairs, results, rounds, warmup, budget_s, min_sample_s)
            if top > 0:
                for b, feeds in feeds_by_batch.items():
                    _say(f"profiling batch {b}")
                    results[b].ops = profile_ops(res.path, runner, feeds, profile_runs, tmp, top)
    out["batches"] = [results[b].to_dict() for b in batches]
    return out


# --- report --------------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(out: dict, env: dict) -> str:
    lines = [
        f"attn-export bench {out['model']}: input {'x'.join(map(str, out['input_shape']))}, "
        f"{out['threads']} thread(s) for both, {out.get('rounds', 0)} interleaved rounds, medians in ms per call"
        + "".join(f", ORT {k}={v}" for k, v in out.get("session_config", {}).items()),
        env["versions"],
        f"{env['machine']}; 1-min load average {env['load_average_1min']['start']} at start, "
        f"{env['load_average_1min']['end']} at end",
    ]
    if env.get("busy"):
        lines.append(f"warning: {env['busy']}")
    if "export" in out:
        e = out["export"]
        lines.append(f"export: {e['nodes']} nodes in {e['seconds']} s, verification passed: {e['verification_passed']}")
        for a in e["adapted"]:
            lines.append(f"  adapted {a}")
    if "error" in out:
        lines.append(f"error: {out['error']}")
        return "\n".join(lines)
    lines.append("")
    head = f"{'batch':>5} {'eager':>10} {'ORT':>10} {'ORT/eager':>9} {'fastest':>8} {'parity max abs':>14}  target"
    lines += [head, "-" * len(head)]
    for r in out["batches"]:
        if r["refused"]:
            lines.append(f"{r['batch']:>5}  refused: {r['refused']}")
            continue
        met = "n/a" if r["target_met"] is None else ("met" if r["target_met"] else "NOT met")
        lines.append(
            f"{r['batch']:>5} {_f(r['eager_ms'], '10.2f')} {_f(r['ort_ms'], '10.2f')} "
            f"{_f(r['ort_over_eager'], '8.2f')}x {_f(r['ort_over_eager_fastest'], '7.2f')}x "
            f"{_f(r['parity_max_abs'], '14.1e')}  <= {out['target_ratio']}x {met}"
        )
    lines.append("('fastest': the ratio of the fastest samples, less sensitive to other load)")
    for r in out["batches"]:
        if r["heaviest_ops"]:
            lines += ["", f"heaviest ONNX ops at batch {r['batch']} (onnxruntime profiler, kernel time per call):"]
            for o in r["heaviest_ops"]:
                lines.append(
                    f"  {o['op_type']:<24} {o['ms_per_call']:9.2f} ms {100 * o['share']:5.1f}%  {o['nodes']} node(s)"
                    + ("" if o.get("in_graph", True) else "  (made by onnxruntime's optimiser)")
                )
    return "\n".join(lines)


def _ints(text: str, what: str, n: int | None = None) -> list[int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: expected integers separated by commas, got {text!r}") from None
    if not vals or any(v < 1 for v in vals) or (n is not None and len(vals) != n):
        count = f"{n} " if n else ""
        raise argparse.ArgumentTypeError(f"{what}: expected {count}positive integers, got {text!r}")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export bench",
        usage="attn-export bench MODEL.pt [options]",
        description="Time a whole model: exported to ONNX (attn_export.export_onnx) on onnxruntime against "
        "the same model in PyTorch eager, on the CPU, same threads, interleaved, parity-gated; with the "
        "heaviest ONNX ops from onnxruntime's profiler.",
    )
    p.add_argument("model", type=Path, help="checkpoint: the attn-export format, or a pickled nn.Module")
    p.add_argument("--batch", type=lambda s: _ints(s, "--batch"), default=[1, 8], help="batch sizes (default 1,8)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    p.add_argument(
        "--input-shape",
        type=lambda s: tuple(_ints(s, "--input-shape")),
        help="C,H,W without the batch (default: the checkpoint's)",
    )
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="allow loading a pickled model, which runs code from the file"
    )
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds at most (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first (default 1)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds of timing rounds at most (default 300)")
    p.add_argument("--min-sample", type=float, default=0.05, help="seconds one sample spans at least (default 0.05)")
    p.add_argument("--top", type=int, default=8, help="heaviest op types to show per batch (0: no profiling)")
    p.add_argument(
        "--session-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an onnxruntime session config entry for the timed session (repeatable), "
        "e.g. session.intra_op.allow_spinning=0",
    )
    p.add_argument("--atol", type=float, default=ATOL, help=f"parity: absolute tolerance (default {ATOL})")
    p.add_argument("--rtol", type=float, default=RTOL, help=f"parity: relative tolerance (default {RTOL})")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--json", action="store_true", help="write the results as JSON to stdout")
    return p


def main(argv: list[str]) -> int:
    from attn_export.bench.machine import busy_warning, load, machine, versions
    from attn_export.export.checkpoint import load_model
    from attn_export.export.errors import ExportError

    args = parser().parse_args(argv)
    for flag in ("threads", "rounds"):
        if getattr(args, flag) < 1:
            print(f"attn-export bench: error: --{flag} must be >= 1", file=sys.stderr)
            return 2
    try:
        loaded = load_model(args.model, trust_checkpoint=args.trust_checkpoint)
    except ExportError as e:
        print(f"attn-export bench: error: {e}", file=sys.stderr)
        return 2
    bad = [c for c in args.session_config if "=" not in c]
    if bad:
        print(f"attn-export bench: error: --session-config expects KEY=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 2
    config = dict(c.split("=", 1) for c in args.session_config)
    shape = args.input_shape or loaded.input_shape
    if not shape:
        print(
            f"attn-export bench: error: {args.model}: the input shape is unknown; give --input-shape C,H,W",
            file=sys.stderr,
        )
        return 2
    load_start = load()
    with contextlib.redirect_stdout(sys.stderr):  # nothing but the results on stdout
        out = run(
            loaded.model,
            shape,
            args.batch,
            threads=args.threads,
            rounds=args.rounds,
            warmup=args.warmup,
            budget_s=args.budget,
            min_sample_s=args.min_sample,
            top=args.top,
            seed=args.seed,
            name=args.model.name,
            session_config=config,
            atol=args.atol,
            rtol=args.rtol,
        )
    env = {
        "versions": versions(),
        "machine": machine(),
        "load_average_1min": {"start": load_start, "end": load()},
    }
    env["busy"] = busy_warning(env["load_average_1min"], args.threads)
    if args.json:
        json.dump({"env": env, **out}, sys.stdout, indent=2)
        print()
    else:
        print(render(out, env))
    if "error" in out:
        print(f"attn-export bench: error: {out['error']}", file=sys.stderr)
        return 1
    return 1 if any(r["refused"] for r in out["batches"]) else 0
