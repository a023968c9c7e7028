"""``attn-export evaluate``: COCO mAP of a shapes detector on a fresh synthetic validation set.

The validation images are ``generate(seed, 0 .. images - 1)`` with a seed (default 12345) that the
training command does not use for its data. Each image is letterboxed to the model's input size, the
model runs (the PyTorch checkpoint, or an ONNX model on onnxruntime), :func:`postprocess` keeps the
detections above a low threshold (every class scoring above 0.001 for a box, class-aware NMS at IoU
0.6, at most 100 per image, as COCO evaluation expects), boxes are mapped back to the image, and
faster-coco-eval (or pycocotools) computes the COCO metrics.

``--compare`` runs the checkpoint on PyTorch and its exported graph on onnxruntime over the same
images and fails (exit 1) when the two mAPs differ by more than ``--max-diff`` (0.005).

``--rect`` letterboxes each image to the smallest rectangle of whole strides with the long side at the
input size (Ultralytics' rect inference; images of one shape batched together), as ``attn-export serve``
does for a graph with free height and width. ``--rect-vs-square`` evaluates both on the same images and
backend (onnxruntime: the checkpoint exported with free height and width) and fails when their mAPs
differ by more than ``--max-diff``: the test for exporting the shipped detector with ``--dynamic-hw``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attn_export.detection.postprocess import letterbox, postprocess, rect_shape, scale_boxes

DEFAULT_SEED = 12345

Predict = Callable[[np.ndarray], np.ndarray]  # (B, 3, S, S) float32 -> (B, N, 4 + C)


def _coco_api():
    """``(COCO, COCOeval)`` from faster-coco-eval, else pycocotools."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            return COCO, COCOeval
        except ImportError as e:
            raise ImportError(
                "evaluation needs faster-coco-eval or pycocotools: pip install 'attn-export[detect]'"
            ) from e


def validation_set(seed: int, count: int) -> tuple[list[np.ndarray], dict]:
    from attn_export.shapes.data import coco_dataset

    return coco_dataset(seed, count)


def detect(
    predict: Predict,
    images: list[np.ndarray],
    size: int = 320,
    batch: int = 16,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 100,
    multi_label: bool = True,
    stride: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image ``(boxes xyxy in image pixels, scores, class ids 0-based)``, as mAP evaluation wants
    them: every class scoring above ``conf`` for a box (``multi_label``, as Ultralytics' validation
    does), class-aware NMS at ``iou``, at most ``max_det``. ``stride``: the rect letterbox (images of
    one letterboxed shape batched together), else the square."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        key = rect_shape(*im.shape[:2], size, stride) if stride else (size, size)
        groups.setdefault(key, []).append(i)
    out: list = [None] * len(images)
    for idx in groups.values():
        for j in range(0, len(idx), batch):
            chunk = idx[j : j + batch]
            boxed = [letterbox(images[i], size, stride) for i in chunk]
            pred = predict(np.stack([b[0] for b in boxed]))
            for (_, scale, pad), i, (boxes, scores, cls) in zip(
                boxed, chunk, postprocess(pred, conf, iou, max_det, multi_label), strict=True
            ):
                out[i] = (scale_boxes(boxes, scale, pad, images[i].shape[:2]), scores, cls)
    return out


def coco_results(coco_gt: dict, detections) -> list[dict]:
    res = []
    for info, (boxes, scores, cls) in zip(coco_gt["images"], detections, strict=True):
        for b, s, c in zip(boxes.tolist(), scores.tolist(), cls.tolist(), strict=True):
            res.append(
                {
                    "image_id": info["id"],
                    "category_id": int(c) + 1,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": float(s),
                }
            )
    return res


def coco_map(coco_gt: dict, detections) -> dict:
    """COCO box metrics: ``mAP50``, ``mAP50_95``, ``mAP75``, per-class ``AP50``/``AP50_95``."""
    COCO, COCOeval = _coco_api()
    results = coco_results(coco_gt, detections)
    names = {c["id"]: c["name"] for c in coco_gt["categories"]}
    empty = {
        "mAP50": 0.0,
        "mAP50_95": 0.0,
        "mAP75": 0.0,
        "per_class": {n: {"AP50": 0.0, "AP50_95": 0.0} for n in names.values()},
    }
    if not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(coco_gt))
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # T, R, K, A, M
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        per_class[names[cat]] = {
            "AP50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else 0.0,
            "AP50_95": float(p[p > -1].mean()) if (p > -1).any() else 0.0,
        }
    return {
        "mAP50_95": float(ev.stats[0]),
        "mAP50": float(ev.stats[1]),
        "mAP75": float(ev.stats[2]),
        "per_class": per_class,
    }


def evaluate(
    predict: Predict,
    images: list[np.ndarray],
    coco_gt: dict,
    size: int = 320,
    batch: int = 16,
    stride: int | None = None,
) -> dict:
    t0 = time.perf_counter()
    dets = detect(predict, images, size, batch, stride=stride)
    took = time.perf_counter() - t0
    metrics = coco_map(coco_gt, dets)
    metrics["images"] = len(images)
    metrics["seconds"] = round(took, 2)
    return metrics


def torch_predictor(model, threads: int | None = None) -> Predict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = model.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return predict


def onnx_predictor(path: str | Path, threads: int | None = None) -> Predict:
    from attn_export.runtime.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(str(path), providers=["CPUExecutionProvider"], threads=threads)
    name, out = runner.input_names[0], runner.output_names[0]

    def predict(x: np.ndarray) -> np.ndarray:
        return runner.infer({name: x})[out]

    return predict


def export_for_eval(model, input_shape, path: Path, dynamic_hw: tuple[int, int, int] | None = None) -> Path:
    from attn_export.export import export_onnx

    extra = {"dynamic_hw": dynamic_hw} if dynamic_hw else {}
    result = export_onnx(model, path, input_shape, batch=(1, 2, 4), seed=0, **extra)
    if dynamic_hw and getattr(result, "hw_refused", ""):
        raise RuntimeError(f"the export kept height and width static: {result.hw_refused}")
    if not result.ok:
        raise RuntimeError(f"the exported graph failed verification: {result.report.table() if result.report else ''}")
    return result.path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export evaluate",
        description="COCO mAP@0.5 and mAP@0.5:0.95 of a shapes detector on a fresh synthetic validation set.",
    )
    p.add_argument("model", type=Path, help="attn-export checkpoint (.pt) or, with --backend onnxruntime, an .onnx")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    p.add_argument("--images", type=int, default=500, help="validation images (default 500)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"validation set seed (default {DEFAULT_SEED})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, help="input size (default: the checkpoint's; 320 for an .onnx)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the library's)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="evaluate the checkpoint on PyTorch AND exported to ONNX on onnxruntime; fail if mAPs differ",
    )
    p.add_argument("--rect", action="store_true", help="rect letterbox (the smallest rectangle of whole strides)")
    p.add_argument(
        "--rect-vs-square",
        action="store_true",
        help="evaluate square and rect inference on the same backend; fail if their mAPs differ by more than "
        "--max-diff (onnxruntime: the checkpoint exported with free height and width)",
    )
    p.add_argument("--stride", type=int, default=32, help="the model's largest stride, for --rect (default 32)")
    p.add_argument(
        "--max-diff",
        type=float,
        default=0.005,
        help="largest allowed mAP difference with --compare or --rect-vs-square",
    )
    p.add_argument("--min-map50", type=float, help="exit 1 if mAP@0.5 is below this")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON only")
    return p


def _print_metrics(name: str, m: dict) -> None:
    per = ", ".join(f"{k} {v['AP50']:.3f}" for k, v in m["per_class"].items())
    print(
        f"{name}: mAP@0.5 {m['mAP50']:.4f}  mAP@0.5:0.95 {m['mAP50_95']:.4f}  "
        f"({m['images']} images, {m['seconds']:.1f}s)\n  AP@0.5 per class: {per}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.model.exists():
        print(f"attn-export evaluate: error: {args.model}: no such file", file=sys.stderr)
        return 2
    is_onnx = args.model.suffix == ".onnx"
    if args.compare and args.rect_vs_square:
        print("attn-export evaluate: error: --compare and --rect-vs-square: choose one", file=sys.stderr)
        return 2
    stride = args.stride if args.rect else None
    if is_onnx and (args.backend != "onnxruntime" or args.compare):
        print(
            "attn-export evaluate: error: an .onnx model needs --backend onnxruntime (and no --compare)",
            file=sys.stderr,
        )
        return 2
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    t0 = time.perf_counter()
    images, coco_gt = validation_set(args.seed, args.images)
    log(f"validation set: {args.images} images, seed {args.seed} ({time.perf_counter() - t0:.1f}s)")
    results: dict[str, dict] = {}
    if args.rect_vs_square:
        return _rect_vs_square(args, images, coco_gt, log)
    if is_onnx:
        size = args.size or 320
        predict = onnx_predictor(args.model, args.threads)
        results["onnxruntime"] = evaluate(predict, images, coco_gt, size, args.batch, stride)
    else:
        from attn_export.export import ExportError, load_model

        try:
            loaded = load_model(args.model)
        except ExportError as e:
            print(f"attn-export evaluate: error: {e}", file=sys.stderr)
            return 2
        shape = loaded.input_shape or (3, args.size or 320, args.size or 320)
        size = args.size or int(shape[-1])
        if args.backend == "torch" or args.compare:
            predict = torch_predictor(loaded.model, args.threads)
            results["torch"] = evaluate(predict, images, coco_gt, size, args.batch, stride)
        if args.backend == "onnxruntime" or args.compare:
            with tempfile.TemporaryDirectory() as tmp:
                log("exporting to ONNX ...")
                hw = (2 * args.stride, size, size) if stride else None
                path = export_for_eval(loaded.model, (3, size, size), Path(tmp) / "model.onnx", hw)
                predict = onnx_predictor(path, args.threads)
                results["onnxruntime"] = evaluate(predict, images, coco_gt, size, args.batch, stride)
    ok = True
    summary: dict = {"seed": args.seed, "images": args.images, "results": results}
    if len(results) == 2:
        diff50 = abs(results["torch"]["mAP50"] - results["onnxruntime"]["mAP50"])
        diff = abs(results["torch"]["mAP50_95"] - results["onnxruntime"]["mAP50_95"])
        summary["diff"] = {"mAP50": diff50, "mAP50_95": diff}
        ok = max(diff, diff50) <= args.max_diff
    if args.min_map50 is not None:
        ok = ok and all(r["mAP50"] >= args.min_map50 for r in results.values())
    if args.json:
        summary["ok"] = ok
        print(json.dumps(summary, indent=2))
    else:
        for name, m in results.items():
            _print_metrics(name, m)
        if "diff" in summary:
            d = summary["diff"]
            verdict = "ok" if max(d.values()) <= args.max_diff else "FAIL"
            print(
                f"torch vs onnxruntime: |d mAP@0.5| {d['mAP50']:.4f}, |d mAP@0.5:0.95| {d['mAP50_95']:.4f} "
                f"(max {args.max_diff}) {verdict}"
            )
    return 0 if ok else 1


def _rect_vs_square(args, images, coco_gt, log) -> int:
    """``--rect-vs-square``: one backend, both letterboxes, the same images; exit 1 past ``--max-diff``."""
    import platform

    with tempfile.TemporaryDirectory() as tmp:
        if args.model.suffix == ".onnx":
            size = args.size or 320
            predict = onnx_predictor(args.model, args.threads)
        else:
            from attn_export.export import ExportError, load_model

            try:
                loaded = load_model(args.model)
            except ExportError as e:
                print(f"attn-export evaluate: error: {e}", file=sys.stderr)
                return 2
            size = args.size or int((loaded.input_shape or (3, 320, 320))[-1])
            if args.backend == "torch":
                predict = torch_predictor(loaded.model, args.threads)
            else:
                log("exporting to ONNX with free height and width ...")
                hw = (2 * args.stride, size, size)
                path = export_for_eval(loaded.model, (3, size, size), Path(tmp) / "model.onnx", hw)
                predict = onnx_predictor(path, args.threads)
        results = {
            "square": evaluate(predict, images, coco_gt, size, args.batch),
            "rect": evaluate(predict, images, coco_gt, size, args.batch, args.stride),
        }
    diff = {k: abs(results["square"][k] - results["rect"][k]) for k in ("mAP50", "mAP50_95")}
    ok = max(diff.values()) <= args.max_diff
    summary = {"seed": args.seed, "images": args.images, "backend": args.backend, "cpu": _cpu_model(),
               "results": results, "diff": diff, "ok": ok}  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.backend} on {_cpu_model() or platform.processor()}, {args.images} images, batch {args.batch}")
        for name, m in results.items():
            _print_metrics(f"{name:6s}", m)
            print(f"  {m['images'] / max(m['seconds'], 1e-9):.1f} images/s (letterbox, network, NMS)")
        print(
            f"rect vs square: |d mAP@0.5| {diff['mAP50']:.4f}, |d mAP@0.5:0.95| {diff['mAP50_95']:.4f} "
            f"(max {args.max_diff}) {'ok' if ok else 'FAIL'}"
        )
    return 0 if ok else 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
