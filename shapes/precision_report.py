"""``python -m attn_export.shapes.precision_report``: half-precision error figures (docs/precision.md).

Per block, at large magnitudes (BatchNorm statistics calibrated on inputs of scale 1000, so the
reduction BatchNorms' running_var reaches 1e5 to 1e6; the outlook block on layer-normed inputs of
scale 3): the largest error against float64 relative to the largest output, for fp32, for fp16 and
bf16 after :func:`~attn_export.runtime.precision.prepare_for_inference`, for a plain ``.to(dtype)``
and for ``torch.autocast``. Then the shipped detector on generated images: the largest class-score
difference from fp32 and the largest box difference (pixels) over cells scoring above 0.5.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch
from torch import nn

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _blocks():
    from attn_export.blocks import GSoPBlock, Involution2d, ODConv2d, OutlookAttention, SKConv

    return {
        "Involution2d": (lambda: Involution2d(32, 7, group_channels=16), (4, 32, 12, 12), 1000.0),
        "ODConv2d": (lambda: ODConv2d(32, 32, 3, padding=1), (4, 32, 12, 12), 1000.0),
        "SKConv": (lambda: SKConv(32, groups=4, min_dim=16), (4, 32, 12, 12), 1000.0),
        "GSoPBlock": (lambda: GSoPBlock(32, 16), (4, 32, 10, 10), 1000.0),
        "OutlookAttention": (lambda: OutlookAttention(32, 2), (4, 12, 12, 32), 3.0),
    }


def calibrate(block: nn.Module, shape, scale: float, seed: int) -> nn.Module:
    """Running statistics from inputs of that magnitude, then random affine parameters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    block.train()
    with torch.no_grad():
        for _ in range(4):
            spread = 0.5 + torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
            block(torch.randn(shape, generator=g) * scale * spread)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return block.eval()


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def block_rows() -> list[dict]:
    from attn_export.runtime.precision import overflowing_values, prepare_for_inference

    rows = []
    for name, (ctor, shape, scale) in _blocks().items():
        torch.manual_seed(0)
        block = calibrate(ctor(), shape, scale, seed=1)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * scale
        row = {"block": name, "input scale": scale}
        variances = [b.max().item() for n, b in block.named_buffers() if n.endswith("running_var")]
        row["max running_var"] = max(variances, default=0.0)
        with torch.no_grad():
            ref = copy.deepcopy(block).double()(x.double())
            row["fp32"] = _rel(block(x), ref)
            for tag, dtype in HALF.items():
                row[f"{tag} prepared"] = _rel(prepare_for_inference(block, dtype)(x.to(dtype)), ref)
                plain = copy.deepcopy(block).to(dtype)(x.to(dtype))
                # nan: a statistic overflows the dtype (shown as "overflow"; the output is garbage)
                row[f"{tag} plain"] = _rel(plain, ref) if not overflowing_values(block, dtype) else float("nan")
                with torch.autocast("cpu", dtype=dtype):
                    row[f"{tag} autocast"] = _rel(block(x), ref)
        rows.append(row)
    return rows


def detector_rows(images: int, seed: int) -> list[dict]:
    from attn_export.detection.postprocess import letterbox
    from attn_export.export import load_model
    from attn_export.runtime.precision import prepare_for_inference
    from attn_export.shapes.data import generate

    loaded = load_model("models/shapes_detector.pt")
    model = loaded.model
    model.eval()  # never chain on eval(): mmcv-style train() returns None
    size = loaded.input_shape[-1]
    x = torch.from_numpy(np.stack([letterbox(generate(seed, i)[0], size)[0] for i in range(images)]))
    folded = prepare_for_inference(model)

    def run(fn, dtype=None):
        outs = []
        for i in range(0, images, 4):
            xi = x[i : i + 4] if dtype is None else x[i : i + 4].to(dtype)
            outs.append(fn(xi).float())
        return torch.cat(outs)

    with torch.no_grad():
        ref = run(model)
        confident = ref[..., 4:].max(-1).values > 0.5
        variants = {
            "fp16 prepared": lambda: run(prepare_for_inference(model, torch.float16), torch.float16),
            "bf16 prepared": lambda: run(prepare_for_inference(model, torch.bfloat16), torch.bfloat16),
            "fp16 plain .half()": lambda: run(copy.deepcopy(model).half(), torch.float16),
            "bf16 plain .bfloat16()": lambda: run(copy.deepcopy(model).bfloat16(), torch.bfloat16),
        }
        for tag, dtype in HALF.items():
            variants[f"{tag} autocast"] = lambda dtype=dtype: _autocast(run, model, dtype)
            variants[f"{tag} autocast, folded"] = lambda dtype=dtype: _autocast(run, folded, dtype)
        rows = []
        for name, fn in variants.items():
            out = fn()
            rows.append(
                {
                    "path": name,
                    "max score diff": (out[..., 4:] - ref[..., 4:]).abs().max().item(),
                    "max box diff (px)": (out[..., :4] - ref[..., :4])[confident].abs().max().item(),
                }
            )
    return rows


def _autocast(run, model, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return run(model)


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = [(lambda v: f"{v:.2e}" if isinstance(v, float) and abs(v) < 0.1 else f"{v:.3g}") for _ in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            "overflow" if r[c] != r[c] else f(r[c]) if isinstance(r[c], float) else str(r[c])
            for f, c in zip(fmt, cols, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_export.shapes.precision_report", description=__doc__)
    p.add_argument("--images", type=int, default=24, help="generated images for the detector (default 24)")
    p.add_argument("--seed", type=int, default=5, help="the generator's seed (default 5)")
    p.add_argument("--no-detector", action="store_true", help="blocks only")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, CPU\n")
    print(_table(block_rows()))
    if not args.no_detector:
        print(f"\nshipped detector, {args.images} images of seed {args.seed}\n")
        print(_table(detector_rows(args.images, args.seed)))
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
