"""``attn-export data``: write a synthetic shapes data set (PNG images + COCO ``instances.json``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export data",
        description="Write synthetic shapes detection images (circle, triangle, rectangle, star) with COCO labels: "
        "OUT/images/NNNNNN.png and OUT/instances.json. The same seed gives the same files.",
    )
    p.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    p.add_argument("--count", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--start", type=int, default=0, help="index of the first image (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.count < 1 or args.start < 0:
        print("attn-export data: error: --count must be >= 1 and --start >= 0", file=sys.stderr)
        return 2
    from attn_export.shapes.data import write_coco

    t0 = time.perf_counter()
    path = write_coco(args.out, args.seed, args.count, args.start)
    print(f"wrote {args.count} images and {path} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
