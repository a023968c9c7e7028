"""Rect vs square inference, and the batcher's two ways with shapes, measured through the service's pipeline.

``python -m attn_export.serve.rect_bench MODEL.onnx`` (a graph with free height and width, e.g.
``attn-export models/shapes_detector.pt --dynamic-hw 64:320:320``) runs, one after the other, on the
same model and machine:

1. wide images (``--count`` each of 1920x1080 and 1280x720, synthetic shapes scenes encoded as JPEG):
   square letterbox vs rect letterbox; images/s and the COCO mAP of the answers on those images;
2. images of mixed aspect ratios (the evaluation set's generator, 256-480 px a side), rect letterbox:
   the batcher grouping by shape vs padding each batch to its largest member; images/s.

Each run sends every image as its own concurrent request through what ``/detect`` runs (decode on a
thread pool, the micro-batcher, the network on onnxruntime, NMS, boxes back to the image), without HTTP;
the best of ``--repeat`` runs is reported. The CPU model is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import json
import sys
import time
from pathlib import Path

from PIL import Image

from attn_export.detection.contract import Params
from attn_export.detection.loader import LoadOptions, ModelError, load
from attn_export.detection.pipeline import Limits, decode_all, detections, take_pixels
from attn_export.detection.postprocess import to_input
from attn_export.serve.batching import Batcher

WIDE = ((1080, 1920), (720, 1280))
EVAL_PARAMS = Params(conf=0.001, iou=0.6, max_det=100)  # as mAP evaluation wants them


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def scenes(seed: int, sizes: list[tuple[int, int] | None]) -> tuple[list[bytes], dict]:
    """Synthetic scenes of ``sizes`` (None: the generator's own) as JPEG bytes, and their COCO ground truth."""
    from attn_export.shapes.data import CATEGORIES, generate

    data, infos, anns = [], [], []
    for i, size in enumerate(sizes):
        img, labels = generate(seed, i, size)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=92)
        data.append(buf.getvalue())
        infos.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": img.shape[0], "width": img.shape[1]})
        anns.extend({**a, "id": len(anns) + 1, "image_id": i + 1} for a in labels)
    return data, {"images": infos, "annotations": anns, "categories": CATEGORIES}


async def _run(model, images: list[bytes], limits: Limits, shapes: str, max_batch: int, threads: int):
    batcher = Batcher(
        lambda px: model.infer(to_input(px)), max_batch=max_batch, max_wait_s=0.005, queue_size=4 * len(images) + 8,
        shapes=shapes,
    ).start()  # fmt: skip
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    loop = asyncio.get_running_loop()

    async def one(data: bytes):
        decoding = await loop.run_in_executor(pool, decode_all, [data], limits)
        results = await batcher.submit(take_pixels(decoding.decoded))
        rows = [r.output for r in results]
        return await loop.run_in_executor(pool, detections, rows, decoding.decoded, EVAL_PARAMS)

    try:
        t0 = time.perf_counter()
        dets = await asyncio.gather(*(one(d) for d in images))
        seconds = time.perf_counter() - t0
    finally:
        batcher.close()
        pool.shutdown()
    return seconds, [d[0] for d in dets], batcher.batches


def measure(model, images, cases: dict[str, tuple[Limits, str]], max_batch: int, threads: int, repeat: int) -> dict:
    """Each case ``name: (limits, batch shapes)`` on ``images``; the cases take turns, ``repeat`` rounds (so a
    busy machine slows them alike), the best round of each is kept."""
    best: dict[str, tuple] = {}
    for _ in range(repeat):
        for name, (limits, shapes) in cases.items():
            seconds, dets, batches = asyncio.run(_run(model, images, limits, shapes, max_batch, threads))
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, dets, batches)
    return {
        name: {"seconds": s, "images_per_s": len(images) / s, "batches": b, "dets": d}
        for name, (s, d, b) in best.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attn_export.serve.rect_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an ONNX graph with free height and width")
    p.add_argument("--count", type=int, default=10, help="images of each wide size (default 10)")
    p.add_argument("--mixed", type=int, default=40, help="images of mixed aspect ratios for the batching test")
    p.add_argument("--repeat", type=int, default=3, help="runs of each case; the best is reported (default 3)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the service's)")
    p.add_argument("--cpu-threads", type=int, default=2, help="decode / NMS threads (default 2)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    from attn_export.shapes.evaluate import coco_map

    try:
        model = load(LoadOptions(args.model, threads=args.threads))
    except ModelError as e:
        print(f"rect_bench: error: {e}", file=sys.stderr)
        return 2
    if not model.rect:
        print(
            f"rect_bench: error: {args.model} has a fixed height and width; export it with --dynamic-hw",
            file=sys.stderr,
        )
        return 2
    size, stride = model.input_size, model.stride
    wide, wide_gt = scenes(args.seed, [hw for hw in WIDE for _ in range(args.count)])
    mixed, _ = scenes(args.seed + 1, [None] * args.mixed)
    run = {"max_batch": args.max_batch, "threads": args.cpu_threads, "repeat": args.repeat}
    rect = Limits(size, stride=stride, min_side=model.min_side)
    cases = measure(model, wide, {"square": (Limits(size), "group"), "rect": (rect, "group")}, **run)
    for name in ("square", "rect"):
        m = coco_map(wide_gt, cases[name]["dets"])
        cases[name]["mAP50"], cases[name]["mAP50_95"] = m["mAP50"], m["mAP50_95"]
    mixed_cases = measure(model, mixed, {"mixed group": (rect, "group"), "mixed pad": (rect, "pad")}, **run)
    cases.update(mixed_cases)
    print(f"{args.model} on onnxruntime ({model.provider}), {cpu_model()}; letterbox {size}, stride {stride}, "
          f"max batch {args.max_batch}, best of {args.repeat}")  # fmt: skip
    n = 2 * args.count
    for name in ("square", "rect"):
        c = cases[name]
        print(f"  wide {name:6s}: {n} images (1920x1080, 1280x720) {c['images_per_s']:6.2f} images/s  "
              f"mAP@0.5 {c['mAP50']:.4f}  mAP@0.5:0.95 {c['mAP50_95']:.4f}")  # fmt: skip
    print(f"  rect / square: {cases['rect']['images_per_s'] / cases['square']['images_per_s']:.2f}x")
    for policy in ("group", "pad"):
        c = cases[f"mixed {policy}"]
        print(
            f"  mixed shapes, {policy:5s}: {args.mixed} images {c['images_per_s']:6.2f} images/s "
            f"in {c['batches']} batches"
        )
    if args.json:
        from attn_export.files import write_text

        figures = {k: {kk: vv for kk, vv in v.items() if kk != "dets"} for k, v in cases.items()}
        write_text(args.json, json.dumps({"cpu": cpu_model(), "model": str(args.model), **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
