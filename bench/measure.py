"""The measuring core of ``attn-export bench --device cuda``: a row per variant, the correctness gate
that runs before any timing, the timer, rates against a peak, and the switch to the reference kernels.

Every variant is checked before it is timed: its output against a float64 reference on the same
(rounded) inputs, as ``max|out - ref| / max|ref|`` within a tolerance per precision. A variant that fails
is reported as wrong and never timed. Times are medians of ``triton.testing.do_bench`` (which flushes
the L2 cache between calls).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

DTYPES = ("fp32", "fp16", "bf16")
#: Correctness gate: ``max|out - ref| / max|ref|`` at most this, per precision of the computation.
REL_TOL = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}
#: Blocks chain several layers (and cuDNN convolutions take TF32 by default): looser, per dtype.
BLOCK_REL_TOL = {"fp32": 5e-3, "fp16": 3e-2, "bf16": 8e-2}
#: ``timer(fn) -> milliseconds`` and ``rate(ms) -> (metric, value, fraction of the peak)``.
Timer = Callable[[Callable[[], object]], float]
Rate = Callable[[float], tuple[str, float, float | None]]


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

    outs, refs = tensors(out), tensors(ref)
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


def tensors(x) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in tensors(item)]
    return []


def measure(
    section: str,
    name: str,
    variant: str,
    dtype: str,
    fn: Callable[[], object],
    ref,
    tol: float,
    timer: Timer,
    rate: Rate | None = None,
    deadline: Deadline | None = None,
    note: str = "",
) -> Row:
    """Run ``fn`` once, gate its output against ``ref``, and only then time it.

    ``rate(ms) -> (metric, value, fraction of peak)``. A wrong output is never timed.
    """
    row = Row(section, name, variant, dtype, note=note)
    if deadline is not None and deadline.spent():
        row.status, row.note = "skipped", join_notes(note, "time budget spent")
        return row
    try:
        out = fn()
    except Exception as e:  # a variant that cannot run is a row, not a crash
        row.status, row.note = "error", join_notes(note, short_error(e))
        return row
    row.rel_err = rel_error(out, ref)
    if not row.rel_err <= tol:
        row.status = "wrong"
        row.note = join_notes(note, f"wrong output: rel err {row.rel_err:.1e} > {tol:.0e}; not timed")
        return row
    try:  # timing can fail where the gated call did not (CUDA-graph recording inside do_bench, ...)
        row.ms = timer(fn)
    except Exception as e:
        row.status, row.note = "error", join_notes(note, "timing failed: " + short_error(e))
        return row
    if rate is not None and row.ms:
        row.metric, row.value, row.fraction = rate(row.ms)
    return row


def failed(rows: Sequence[Row]) -> list[Row]:
    """Rows whose variant gave a wrong answer or could not run (skipped and unavailable are not failures)."""
    return [r for r in rows if r.status in ("wrong", "error")]


def join_notes(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


# ------------------------------------------------------------------------------------------ timing
def cuda_timer(warmup_ms: int = 25, rep_ms: int = 100) -> Timer:
    """Median milliseconds of ``fn`` with ``triton.testing.do_bench`` (L2 flushed between calls)."""
    from triton.testing import do_bench

    def timer(fn: Callable[[], object]) -> float:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    return timer


def gbps(nbytes: int, peak: float | None) -> Rate:
    def rate(ms: float):
        v = nbytes / (ms * 1e-3) / 1e9
        return "GB/s", v, (v / peak if peak else None)

    return rate


def tflops(flops: float, peak: float | None) -> Rate:
    def rate(ms: float):
        v = flops / (ms * 1e-3) / 1e12
        return "TFLOP/s", v, (v / peak if peak else None)

    return rate


# ------------------------------------------------------------------------------------------ switches
@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Inside: the ops' CUDA kernels take their plain-torch reference instead of Triton (restored after)."""
    from attn_export.plugins import _kernels  # where use_cuda_kernel looks it up

    saved = _kernels._kernels_available
    _kernels._kernels_available = lambda: False
    try:
        yield
    finally:
        _kernels._kernels_available = saved


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
