"""``attn-export bench --device cuda``: every GPU figure of issue 10 in one command.

Sections, in this order (a time budget, ``--budget-s``, skips what is left once spent, and says so):

``peaks``
    What the card does in this very run: a device-to-device copy (GB/s, bytes read plus written) and a
    large matmul (TFLOP/s) in fp32, TF32, fp16 and bf16. The other sections are reported against these.
``ops``
    The three dynamic kernels at the issue's shapes (involution B8 C256 56x56 k7 G16; dynamic conv
    B32 C256 28x28 k3; outlook B32 C192 6 heads 28x28 k3, at stride 1 and at VOLO's stride 2), each in
    fp32, fp16 and bf16: the official code's formulation in eager PyTorch, ``torch.compile`` of it, our
    plain-torch reference and our Triton kernel. GB/s (the minimal bytes: inputs read once, output
    written once) for the memory-bound two, TFLOP/s for the convolution, with the fraction of the peak.
``blocks``
    The five blocks at B16 C128 56x56: the official-layout module (:mod:`attn_export.bench.upstream`)
    in eager and compiled, and ours with the official weights (as ``attn-export`` adapts them), with
    its Triton kernels and with the plain-torch reference kernels.
``detector``
    The shipped detector's images/s at batch 1, 32 and 128: eager, ``torch.compile(mode=
    "reduce-overhead")`` (CUDA graphs), and onnxruntime's CUDA provider where it is installed.

Every variant is checked before it is timed: its output against a float64 reference on the same
(rounded) inputs, as ``max|out - ref| / max|ref|`` within a tolerance per precision. A variant that fails
is reported as wrong and never timed; the command then exits 1. Without CUDA it exits 3 and says so.
Times are medians of ``triton.testing.do_bench`` (which flushes the L2 cache between calls).

Output: a table on stdout (``--json``: the JSON instead), and ``--json-out PATH`` writes the JSON too.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Exit status when no CUDA device is visible (as ``--trt`` without TensorRT).
EXIT_NO_CUDA = 3
SECTIONS = ("peaks", "ops", "blocks", "detector")
DTYPES = ("fp32", "fp16", "bf16")
#: Correctness gate: ``max|out - ref| / max|ref|`` at most this, per precision of the computation.
REL_TOL = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}
#: Blocks chain several layers (and cuDNN convolutions take TF32 by default): looser, per dtype.
BLOCK_REL_TOL = {"fp32": 5e-3, "fp16": 3e-2, "bf16": 8e-2}
DETECTOR_BATCHES = (1, 32, 128)
#: What "ours, CUDA op kernels" runs for each block's dynamic kernel.
BLOCK_KERNELS = {
    "involution": "involution2d: Triton",
    "outlook": "outlook_aggregate: Triton",
    "odconv": "dynamic_conv2d: cuDNN (the op's CUDA kernel)",
    "gsop": "no dynamic kernel",
    "skconv": "no dynamic kernel",
}
DEFAULT_BUDGET_S = 170.0
#: The device the command measures (the tests run its logic on "cpu").
DEVICE = "cuda"


# ------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    """One measured (or refused, or skipped) variant."""

    section: str
    name: str
    variant: str
    dtype: str
    status: str = "ok"  # ok | wrong | error | skipped | unavailable
    ms: float | None = None
    rel_err: float | None = None
    metric: str = ""  # GB/s | TFLOP/s | images/s
    value: float | None = None
    fraction: float | None = None  # of the peak measured in the same run
    speedup: float | None = None  # official eager time / this time (same case and dtype)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Deadline:
    """The run's time budget (seconds from creation)."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def spent(self) -> bool:
        return self.left() <= 0


def rel_error(out, ref) -> float:
    """``max|out - ref| / max|ref|`` in float64 (inf for a shape mismatch or a non-finite output)."""
    import torch

    outs, refs = _tensors(out), _tensors(ref)
    if len(outs) != len(refs):
        return math.inf
    worst = 0.0
    for o, r in zip(outs, refs, strict=True):
        if o.shape != r.shape:
            return math.inf
        o, r = o.detach().double(), r.detach().double().to(o.device)
        if not torch.isfinite(o).all():
            return math.inf
        scale = max(float(r.abs().max()) if r.numel() else 0.0, 1e-30)
        worst = max(worst, float((o - r).abs().max()) / scale if o.numel() else 0.0)
    return worst


def _tensors(x) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def measure(
    section: str,
    name: str,
    variant: str,
    dtype: str,
    fn: Callable[[], object],
    ref,
    tol: float,
    timer: Callable[[Callable[[], object]], float],
    rate: Callable[[float], tuple[str, float, float | None]] | None = None,
    deadline: Deadline | None = None,
    note: str = "",
) -> Row:
    """Run ``fn`` once, gate its output against ``ref``, and only then time it.

    ``rate(ms) -> (metric, value, fraction of peak)``. A wrong output is never timed.
    """
    row = Row(section, name, variant, dtype, note=note)
    if deadline is not None and deadline.spent():
        row.status, row.note = "skipped", _join(note, "time budget spent")
        return row
    try:
        out = fn()
    except Exception as e:  # a variant that cannot run is a row, not a crash
        row.status, row.note = "error", _join(note, _short(e))
        return row
    row.rel_err = rel_error(out, ref)
    if not row.rel_err <= tol:
        row.status = "wrong"
        row.note = _join(note, f"wrong output: rel err {row.rel_err:.1e} > {tol:.0e}; not timed")
        return row
    row.ms = timer(fn)
    if rate is not None and row.ms:
        row.metric, row.value, row.fraction = rate(row.ms)
    return row


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


# ------------------------------------------------------------------------------------------ timing
def cuda_timer(warmup_ms: int = 25, rep_ms: int = 100) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn`` with ``triton.testing.do_bench`` (L2 flushed between calls)."""
    from triton.testing import do_bench

    def timer(fn: Callable[[], object]) -> float:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    return timer


def gbps(nbytes: int, peak: float | None) -> Callable[[float], tuple[str, float, float | None]]:
    def rate(ms: float):
        v = nbytes / (ms * 1e-3) / 1e9
        return "GB/s", v, (v / peak if peak else None)

    return rate


def tflops(flops: float, peak: float | None) -> Callable[[float], tuple[str, float, float | None]]:
    def rate(ms: float):
        v = flops / (ms * 1e-3) / 1e12
        return "TFLOP/s", v, (v / peak if peak else None)

    return rate


# ------------------------------------------------------------------------------------------ switches
@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Inside: the ops' CUDA kernels take their plain-torch reference instead of Triton (restored after)."""
    import attn_export.plugins as plugins

    saved = plugins._kernels_available
    plugins._kernels_available = lambda: False
    try:
        yield
    finally:
        plugins._kernels_available = saved


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ------------------------------------------------------------------------------------------ peaks
def run_peaks(device: str, timer, deadline: Deadline, copy_mib: int = 1024, n: int = 8192) -> tuple[list[Row], dict]:
    """Copy bandwidth and matmul throughput on this device, now."""
    import torch

    rows: list[Row] = []
    peaks: dict[str, float] = {}
    src = torch.randn(copy_mib * 2**18, device=device)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * 4
    row = measure("peaks", f"copy {copy_mib} MiB", "dst.copy_(src)", "fp32", lambda: dst.copy_(src), src, 0.0, timer)
    if row.ms:
        row.metric, row.value = "GB/s", nbytes / (row.ms * 1e-3) / 1e9
        peaks["copy_gbps"] = row.value
    rows.append(row)
    src = dst = None  # free the copy buffers before the matmuls
    matmul = torch.backends.cuda.matmul
    for label, dt, tf32 in (
        ("fp32", "fp32", False),
        ("tf32", "fp32", True),
        ("fp16", "fp16", False),
        ("bf16", "bf16", False),
    ):
        a = torch.randn(n, n, device=device).to(_torch_dtype(dt))
        b = torch.randn(n, n, device=device).to(_torch_dtype(dt))
        saved = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            ref = a[:64].double() @ b.double()
            row = measure(
                "peaks",
                f"matmul {n}^3",
                "torch.mm",
                label,
                lambda a=a, b=b: (a @ b)[:64],
                ref,
                2e-2,
                timer,
                deadline=deadline,
            )
            if row.ms:  # timed on the whole product; the slice above only keeps the check cheap
                row.ms = timer(lambda a=a, b=b: a @ b)
                row.metric, row.value = "TFLOP/s", 2 * n**3 / (row.ms * 1e-3) / 1e12
                peaks[f"matmul_{label}_tflops"] = row.value
        finally:
            matmul.allow_tf32 = saved
        rows.append(row)
    return rows, peaks


# ------------------------------------------------------------------------------------------ ops
@dataclass(frozen=True)
class OpCase:
    """One op at one shape."""

    op: str  # involution | dynamic_conv | outlook
    label: str
    b: int
    c: int
    h: int
    w: int
    k: int
    stride: int = 1
    groups: int = 1  # involution groups, conv groups, outlook heads
    cout: int = 0  # dynamic_conv only


def issue_op_cases() -> list[OpCase]:
    return [
        OpCase("involution", "involution B8 C256 56x56 k7 G16", 8, 256, 56, 56, 7, 1, 16),
        OpCase("dynamic_conv", "dynamic_conv B32 C256 28x28 k3", 32, 256, 28, 28, 3, 1, 1, 256),
        OpCase("outlook", "outlook B32 C192 m6 28x28 k3 s1", 32, 192, 28, 28, 3, 1, 6),
        OpCase("outlook", "outlook B32 C192 m6 28x28 k3 s2 (VOLO)", 32, 192, 28, 28, 3, 2, 6),
    ]


def op_inputs(case: OpCase, device: str, dtype, seed: int = 0):
    """Fresh random inputs (as the blocks produce them: softmaxed outlook attention)."""
    import torch

    from attn_export.plugins._taps import out_size

    g = torch.Generator(device=device).manual_seed(seed)
    k, s, p = case.k, case.stride, case.k // 2
    ho, wo = out_size(case.h, k, s, p, 1), out_size(case.w, k, s, p, 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x = rnd(case.b, case.c, case.h, case.w)
    if case.op == "involution":
        return x, rnd(case.b, case.groups, k * k, ho, wo)
    if case.op == "dynamic_conv":
        return x, rnd(case.b, case.cout, case.c // case.groups, k, k) / math.sqrt(case.c // case.groups * k * k)
    attn = torch.randn(case.b, case.groups, ho * wo, k * k, k * k, generator=g, device=device).softmax(-1)
    return x, attn.to(dtype)


def op_cost(case: OpCase, itemsize: int) -> tuple[int, float]:
    """``(minimal bytes, flops)``: inputs read once and the output written once; multiply-adds x 2."""
    from attn_export.plugins._taps import out_size

    k, s, p = case.k, case.stride, case.k // 2
    ho, wo = out_size(case.h, k, s, p, 1), out_size(case.w, k, s, p, 1)
    x = case.b * case.c * case.h * case.w
    if case.op == "involution":
        out, other = case.b * case.c * ho * wo, case.b * case.groups * k * k * ho * wo
        flops = 2.0 * out * k * k
    elif case.op == "dynamic_conv":
        out, other = case.b * case.cout * ho * wo, case.b * case.cout * (case.c // case.groups) * k * k
        flops = 2.0 * out * (case.c // case.groups) * k * k
    else:
        out, other = x, case.b * case.groups * ho * wo * k**4
        flops = 2.0 * case.b * case.c * ho * wo * k**4
    return (x + other + out) * itemsize, flops


def official_op(case: OpCase) -> Callable:
    """The op as the official code writes it (unfold/multiply/sum; batch-folded conv; unfold/matmul/fold)."""
    import torch.nn.functional as F

    k, s, p = case.k, case.stride, case.k // 2

    if case.op == "involution":  # d-li14/involution, involution_naive.py

        def involution(x, weight):
            b, c = x.shape[:2]
            g, ho, wo = weight.shape[1], weight.shape[3], weight.shape[4]
            cols = F.unfold(x, k, 1, p, s).view(b, g, c // g, k * k, ho, wo)
            return (weight.unsqueeze(2) * cols).sum(dim=3).view(b, c, ho, wo)

        return involution
    if case.op == "dynamic_conv":  # OSVAI/ODConv: the batch folded into the groups

        def dynamic_conv(x, weight):
            b, _, h, w = x.shape
            out = F.conv2d(
                x.reshape(1, -1, h, w), weight.reshape(-1, *weight.shape[2:]), None, s, p, 1, case.groups * b
            )
            return out.view(b, weight.shape[1], out.shape[-2], out.shape[-1])

        return dynamic_conv

    def outlook(v, attn):  # sail-sg/volo: unfold, attn @ v, fold
        b, c, h, w = v.shape
        heads, n = attn.shape[1], attn.shape[2]
        cols = F.unfold(v, k, 1, p, s).reshape(b, heads, c // heads, k * k, n).permute(0, 1, 4, 3, 2)
        y = (attn @ cols).permute(0, 1, 4, 3, 2).reshape(b, c * k * k, n)
        return F.fold(y, (h, w), k, 1, p, s)

    return outlook


def ours_op(case: OpCase, triton: bool | str, tf32: bool) -> Callable:
    """Our plain-torch reference, or our Triton kernel (dynamic conv: the autotuned implicit GEMM;
    involution with ``triton="rows"``: the row-reuse candidate)."""
    k, s, p = case.k, case.stride, case.k // 2
    if case.op == "involution":
        from attn_export.plugins.involution import op as inv

        if triton == "rows":
            from attn_export.plugins.involution.cuda_kernel import involution2d_cuda_rows

            return lambda x, wt: involution2d_cuda_rows(x, wt, k, s, p, 1)

        if triton:
            from attn_export.plugins.involution.cuda_kernel import involution2d_cuda

            return lambda x, wt: involution2d_cuda(x, wt, k, s, p, 1)
        return lambda x, wt: inv.reference(x, wt, k, s, p, 1)
    if case.op == "dynamic_conv":
        from attn_export.plugins.dynamic_conv import op as dconv

        if triton:
            from attn_export.plugins.dynamic_conv.cuda_kernel import dynamic_conv2d_cuda

            return lambda x, wt: dynamic_conv2d_cuda(x, wt, (s, s), (p, p), (1, 1), case.groups, allow_tf32=tf32)
        return lambda x, wt: dconv.reference(x, wt, (s, s), (p, p), (1, 1), case.groups)
    from attn_export.plugins.outlook import op as outl

    if triton:
        from attn_export.plugins.outlook.cuda_kernel import outlook_aggregate_cuda

        return lambda v, a: outlook_aggregate_cuda(v, a, k, p, s)
    return lambda v, a: outl.reference(v, a, k, p, s)


def run_ops(
    cases: Sequence[OpCase],
    dtypes: Sequence[str],
    device: str,
    timer,
    deadline: Deadline,
    peaks: dict,
    compile_dtypes: Sequence[str] = DTYPES,
    triton: bool = True,
    only_compiled: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> list[Row]:
    """Each case in each dtype: official eager, compiled (``compile_dtypes``), our reference and Triton
    kernel. ``only_compiled``: the compiled variants alone (the second pass of a budgeted run)."""
    import torch

    rows: list[Row] = []
    for case in cases:
        ref_fn = ours_op(case, triton=False, tf32=False)
        for dt in dtypes:
            torch_dt = _torch_dtype(dt)
            inputs = op_inputs(case, device, torch_dt)
            with torch.no_grad():
                ref = ref_fn(*(t.double() for t in inputs))
            nbytes, flops = op_cost(case, torch_dt.itemsize)
            # cuDNN (the official and reference convolutions) takes TF32 for fp32 unless torch forbids it;
            # our Triton convolution follows the same switch so the row compares like with like.
            tf32 = case.op == "dynamic_conv" and dt == "fp32" and bool(torch.backends.cudnn.allow_tf32)
            prec = "tf32" if tf32 else dt
            if case.op == "dynamic_conv":
                key = "matmul_tf32_tflops" if tf32 else f"matmul_{dt}_tflops"
                rate = tflops(flops, peaks.get(key))
            else:
                rate = gbps(nbytes, peaks.get("copy_gbps"))
            tol = REL_TOL[prec]
            label = f"{dt} (TF32)" if tf32 else dt
            official = official_op(case)
            variants: list[tuple[str, Callable]] = [] if only_compiled else [("official eager", official)]
            if dt in compile_dtypes:
                variants.append(("torch.compile(official)", torch.compile(official, dynamic=False)))
            if not only_compiled:
                variants.append(("ours, torch reference", ours_op(case, triton=False, tf32=tf32)))
                if triton:
                    variants.append(("ours, Triton", ours_op(case, triton=True, tf32=tf32)))
                if triton and case.op == "involution":  # a candidate kernel, timed beside the default one
                    variants.append(("ours, Triton row reuse (candidate)", ours_op(case, triton="rows", tf32=tf32)))
            if not variants:
                continue
            for variant, fn in variants:
                say(f"ops: {case.label} {label} {variant}")

                def call(fn=fn, inputs=inputs):
                    with torch.no_grad():
                        return fn(*inputs)

                rows.append(measure("ops", case.label, variant, label, call, ref, tol, timer, rate, deadline))
            del inputs, ref
    return rows


# ------------------------------------------------------------------------------------------ blocks
def run_blocks(
    names: Sequence[str],
    dtypes: Sequence[str],
    device: str,
    timer,
    deadline: Deadline,
    batch: int = 16,
    channels: int = 128,
    size: int = 56,
    compile_dtypes: Sequence[str] = ("fp32",),
    only_compiled: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> list[Row]:
    """Official module vs ours with its weights, eager and compiled (``compile_dtypes``), in each dtype;
    ``only_compiled``: the compiled variants alone."""
    import torch
    from torch import nn

    from attn_export.bench.blocks import _randomize_norms, specs
    from attn_export.export.adapt import adapt_model

    spec_map = specs(channels, size)
    rows: list[Row] = []
    for i, name in enumerate(names):
        spec = spec_map[name]
        torch.manual_seed(i)
        official = spec.official()
        official.eval()  # never chain on eval(): mmcv-style train() returns None
        _randomize_norms(official, i)
        if spec.ours is None:  # the official weights, through the exporter's adapters (checked exact there)
            holder = nn.Sequential(copy.deepcopy(official)).eval()
            sample = torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(i))
            records = adapt_model(holder, sample)
            if not records or records[0].action != "adapted":
                rows.append(Row("blocks", name, "ours", "-", "error", note="the official module was not adapted"))
                continue
            ours, note = holder[0], ""
        else:
            ours = spec.ours(official)
            ours.eval()
            _randomize_norms(ours, i + 1)
            note = "ours is a different function (SKConv): checked against its own float64 output"
        x32 = torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(100 + i)).to(device)
        with torch.no_grad():
            ref_official = copy.deepcopy(official).double().to(device)(x32.double())
            ref_ours = ref_official if spec.ours is None else copy.deepcopy(ours).double().to(device)(x32.double())
        for dt in dtypes:
            torch_dt = _torch_dtype(dt)
            x = x32.to(torch_dt)
            off = copy.deepcopy(official).to(device=device, dtype=torch_dt)
            our = copy.deepcopy(ours).to(device=device, dtype=torch_dt)
            tol = BLOCK_REL_TOL[dt]

            def eager(m, x=x):
                def run():
                    with torch.no_grad():
                        return m(x)

                return run

            def with_reference_kernels(m, x=x):
                def run():
                    with torch.no_grad(), reference_kernels():
                        return m(x)

                return run

            if only_compiled and dt not in compile_dtypes:
                continue
            variants = [] if only_compiled else [("official eager", eager(off), ref_official, "")]
            if dt in compile_dtypes:
                variants.append(("torch.compile(official)", eager(torch.compile(off, dynamic=False)), ref_official, ""))
            kernels = BLOCK_KERNELS.get(name, "")
            if not only_compiled:
                variants += [
                    ("ours, CUDA op kernels", eager(our), ref_ours, _join(note, kernels)),
                    ("ours, torch reference kernels", with_reference_kernels(our), ref_ours, note),
                ]
            for variant, fn, ref, nt in variants:
                say(f"blocks: {name} {dt} {variant}")
                rows.append(measure("blocks", name, variant, dt, fn, ref, tol, timer, deadline=deadline, note=nt))
    return rows


# ------------------------------------------------------------------------------------------ detector
def run_detector(
    path: Path,
    device: str,
    timer,
    deadline: Deadline,
    batches: Sequence[int] = DETECTOR_BATCHES,
    modes: Sequence[str] = ("eager", "compiled", "ort"),
    say: Callable[[str], None] = lambda m: None,
) -> list[Row]:
    """Images/s of a checkpoint: eager, compiled with CUDA graphs, onnxruntime's CUDA provider (``modes``)."""
    import torch

    from attn_export.export import load_model

    rows: list[Row] = []
    try:
        loaded = load_model(path)
    except Exception as e:
        return [Row("detector", str(path), "load", "fp32", "error", note=_short(e))]
    model = loaded.model
    model.eval()  # never chain on eval() (mmcv-style train() returns None)
    model = model.to(device)
    shape = tuple(loaded.input_shape or ())
    compiled_model = torch.compile(model, mode="reduce-overhead", dynamic=False) if "compiled" in modes else None
    ort_runner, ort_note = _ort_cuda(loaded, shape, max(batches)) if "ort" in modes else (None, "")
    for bs in batches:
        x = torch.rand(bs, *shape, generator=torch.Generator().manual_seed(bs)).to(device)
        with torch.no_grad():
            ref = model(x)

        def rate(ms, bs=bs):
            return "images/s", bs / (ms * 1e-3), None

        def eager(x=x):
            with torch.no_grad():
                return model(x)

        name = f"{path.name} batch {bs}"
        say(f"detector: batch {bs}")
        if "eager" in modes:
            rows.append(measure("detector", name, "torch eager", "fp32", eager, ref, 1e-4, timer, rate, deadline))
        if compiled_model is not None:

            def comp(x=x):
                with torch.no_grad():
                    out = compiled_model(x)
                return [t.clone() for t in _tensors(out)]  # CUDA-graph outputs are overwritten by the next call

            rows.append(
                measure(
                    "detector", name, "torch.compile reduce-overhead", "fp32", comp, ref, 1e-3, timer, rate, deadline
                )
            )
        if "ort" not in modes:
            pass
        elif ort_runner is None:
            rows.append(Row("detector", name, "onnxruntime CUDA", "fp32", "unavailable", note=ort_note))
        else:
            feeds = {ort_runner.input_names[0]: x.cpu().numpy()}

            def ort(feeds=feeds):
                return [torch.from_numpy(v) for v in ort_runner.infer(feeds).values()]

            ref_list = [t.cpu() for t in _tensors(ref)]
            rows.append(
                measure("detector", name, "onnxruntime CUDA", "fp32", ort, ref_list, 1e-3, timer, rate, deadline)
            )
    return rows


def _ort_cuda(loaded, shape, max_batch: int):
    """An onnxruntime CUDA runner for the model (exported to a temporary file), or (None, why not)."""
    try:
        import onnxruntime as ort
    except Exception as e:
        return None, f"onnxruntime cannot be imported ({_short(e)})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, "onnxruntime has no CUDA provider here (install onnxruntime-gpu)"
    try:
        from attn_export.export import export_onnx
        from attn_export.runtime.runners import OnnxRuntimeRunner

        with tempfile.TemporaryDirectory(prefix="attn-export-bench-cuda-") as tmp:
            res = export_onnx(
                copy.deepcopy(loaded.model).cpu(), Path(tmp) / "model.onnx", shape, (1, 1, max_batch), verify=False
            )
            runner = OnnxRuntimeRunner(res.path, providers=["CUDAExecutionProvider"])
        return runner, ""
    except Exception as e:
        return None, f"export or onnxruntime session failed ({_short(e)})"


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
    "ours, Triton row reuse (candidate)",
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


def failed(rows: Sequence[Row]) -> list[Row]:
    """Rows whose variant gave a wrong answer or could not run (skipped and unavailable are not failures)."""
    return [r for r in rows if r.status in ("wrong", "error")]


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def cuda_problem() -> str | None:
    """Why this machine cannot run the CUDA benchmark, or None."""
    import torch

    if not torch.cuda.is_available():
        return (
            "no CUDA device is visible to torch (torch.cuda.is_available() is False; this torch is "
            f"{torch.__version__}). The CUDA benchmark needs an NVIDIA GPU and a CUDA build of torch; "
            "without one, run `attn-export bench` (the CPU/onnxruntime benchmark)."
        )
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton): the kernels and the timer need it."
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        return "TRITON_INTERPRET is set: the CUDA benchmark times compiled kernels; unset it."
    return None


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
            "versions": _versions(),
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
            _write_json(args.json_out, result())

    if "peaks" in sections:
        say("peaks: copy bandwidth, matmul throughput")
        r, peaks = run_peaks(dev, timer, deadline)
        rows += r
        checkpoint()
    from attn_export.bench.blocks import BLOCKS

    cases = issue_op_cases()
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
        _write_json(args.json_out, document)
    print(json.dumps(document, indent=2) if args.json else render(document))
    bad_rows = failed(rows)
    for r in bad_rows:
        print(
            f"attn-export bench --device cuda: {r.status}: {r.section} {r.name} {r.variant} {r.dtype}: {r.note}",
            file=sys.stderr,
        )
    return 1 if bad_rows else 0


def _versions() -> str:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover - cuda_problem() checked it is there
        tv = "-"
    from attn_export import __version__

    return f"attn-export {__version__} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tv}"


if __name__ == "__main__":
    sys.exit(main())
