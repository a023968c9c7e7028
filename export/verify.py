"""Compare runners' outputs: per-output error statistics and a pass/fail per tolerance.

Running and comparing are separate steps with plain result objects (Polygraphy's shape). A check
passes when every element satisfies ``|out - ref| <= atol + rtol * |ref|``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class OutputCheck:
    """Error statistics of one output at one batch size."""

    name: str
    batch: int
    shape: list[int]
    max_abs: float
    max_rel: float
    mean_abs: float
    p99_abs: float
    atol: float
    rtol: float
    passed: bool


@dataclass
class VerifyReport:
    """The result of verifying an exported graph against PyTorch."""

    backend: str
    seed: int
    batches: list[int]
    outputs: list[OutputCheck] = field(default_factory=list)
    blocks: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(c.passed for c in self.outputs)

    @property
    def first_divergent_block(self) -> str | None:
        for c in self.blocks:
            if not c.passed:
                return c.name
        return None

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "seed": self.seed,
            "batches": self.batches,
            "passed": self.passed,
            "first_divergent_block": self.first_divergent_block,
            "outputs": [asdict(c) for c in self.outputs],
            "blocks": [asdict(c) for c in self.blocks],
        }

    def table(self) -> str:
        """A fixed-width table of every check, outputs first, then blocks in execution order."""
        head = f"{'check':<34} {'batch':>5} {'max abs':>10} {'max rel':>10} {'mean abs':>10} {'p99 abs':>10}  result"
        lines = [head, "-" * len(head)]
        for kind, checks in (("output", self.outputs), ("block", self.blocks)):
            for c in checks:
                label = f"{kind} {c.name}"
                label = label if len(label) <= 34 else "…" + label[-33:]
                lines.append(
                    f"{label:<34} {c.batch:>5} {c.max_abs:>10.2e} {c.max_rel:>10.2e} {c.mean_abs:>10.2e} "
                    f"{c.p99_abs:>10.2e}  {'ok' if c.passed else 'FAIL'}"
                )
        verdict = "PASSED" if self.passed else "FAILED"
        tol = f"atol={self.outputs[0].atol:g}, rtol={self.outputs[0].rtol:g}" if self.outputs else ""
        lines.append(f"verification {verdict} on {self.backend} ({tol}, seed {self.seed})")
        if self.first_divergent_block:
            lines.append(f"first block to diverge: {self.first_divergent_block}")
        return "\n".join(lines)


def compare_arrays(name: str, batch: int, ref: np.ndarray, out: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Statistics of ``out`` against ``ref`` (computed in float64)."""
    if ref.shape != out.shape:
        return OutputCheck(
            name, batch, list(ref.shape), float("inf"), float("inf"), float("inf"), float("inf"), atol, rtol, False
        )
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    diff = np.abs(o - r)
    finite = bool(np.isfinite(o).all() == np.isfinite(r).all())
    if diff.size == 0:
        return OutputCheck(name, batch, list(ref.shape), 0.0, 0.0, 0.0, 0.0, atol, rtol, True)
    diff = np.where(np.isnan(diff) & np.isnan(o) & np.isnan(r), 0.0, diff)
    rel = diff / np.maximum(np.abs(r), np.finfo(np.float32).tiny)
    passed = finite and bool(np.all(diff <= atol + rtol * np.abs(r)))
    return OutputCheck(
        name,
        batch,
        list(ref.shape),
        float(diff.max()),
        float(rel.max()),
        float(diff.mean()),
        float(np.quantile(diff, 0.99)),
        atol,
        rtol,
        passed,
    )


def compare_outputs(
    ref: Mapping[str, np.ndarray],
    out: Mapping[str, np.ndarray],
    batch: int,
    atol: float,
    rtol: float,
    names: Mapping[str, str] | None = None,
) -> list[OutputCheck]:
    """Compare every output of ``ref`` with the same-named output of ``out``."""
    checks = []
    for key, r in ref.items():
        label = (names or {}).get(key, key)
        if key not in out:
            checks.append(
                OutputCheck(
                    label,
                    batch,
                    list(r.shape),
                    float("inf"),
                    float("inf"),
                    float("inf"),
                    float("inf"),
                    atol,
                    rtol,
                    False,
                )
            )
            continue
        checks.append(compare_arrays(label, batch, r, out[key], atol, rtol))
    return checks
