"""``attn-export train``: train the shapes detector on the CPU, reproducibly from a seed.

The training images are ``generate(seed, 0 .. images - 1)``, letterboxed to the input size once
(in ``--workers`` processes) and kept in memory as uint8; every epoch visits them in a seeded order
with random flips and transposes (the eight symmetries of the square; every class is symmetric
under them) and, with ``--scales``, batches resized down to a random smaller input size before the
last ``--final-epochs`` epochs (cheaper steps, and robustness to scale). AdamW with a linear
warm-up and a cosine decay, an exponential moving average (EMA) of the weights, which is what gets
evaluated and saved.

``--procs`` processes (default 2, one thread each) train data-parallel: each takes its share of
every batch and the gradients are averaged (gloo all-reduce) before each step, which uses a few
shared cores better than intra-op threads do.

Every ``--val-every`` epochs (and at the end) a quick COCO mAP on ``--val-images`` images from a
separate seed is printed and the checkpoint is written (the project's format, loadable with
``torch.load(weights_only=True)``), so an interrupted run still leaves its latest weights.

Runs are reproducible for a given seed, process and thread counts and torch build; the checkpoint's
``meta`` records the command line, those counts and the figures, and for a run started with ``--init``
the runs that made its starting weights (``history``, oldest first).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from attn_export.files import atomic_path
from attn_export.shapes.data import CLASSES, MAX_OBJECTS

VAL_SEED_OFFSET = 100_003  # quick validation uses seed + this: images never seen in training


def make_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Letterboxed image (size, size, 3) uint8, boxes (K, 4) xyxy in its pixels, labels (K,) 0-based."""
    from attn_export.detection.postprocess import letterbox_u8
    from attn_export.shapes.data import generate

    img, anns = generate(seed, index)
    boxed, scale, (px, py) = letterbox_u8(img, size)
    boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes = boxes * scale + np.array([px, py, px, py], np.float32)
    labels = np.array([a["category_id"] - 1 for a in anns], np.int64)
    return np.ascontiguousarray(boxed.transpose(1, 2, 0)), boxes, labels


def _make_chunk(args: tuple[int, int, int, int, str | None]):
    seed, start, stop, size, cache = args
    path = Path(cache) / f"shapes_seed{seed}_size{size}_{start:07d}_{stop:07d}.npz" if cache else None
    if path is not None and path.exists():
        with np.load(path) as z:
            images = z["images"]
            return [(images[i], z[f"boxes{i}"], z[f"labels{i}"]) for i in range(stop - start)]
    samples = [make_sample(seed, i, size) for i in range(start, stop)]
    if path is not None:
        arrays = {"images": np.stack([s[0] for s in samples])}
        for i, (_, b, lab) in enumerate(samples):
            arrays[f"boxes{i}"], arrays[f"labels{i}"] = b, lab
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
    return samples


def build_dataset(seed: int, count: int, size: int, workers: int, log=print, cache: Path | None = None):
    """All training samples: images (count, size, size, 3) uint8, boxes (count, M, 4), labels (count, M)
    (-1 pads), in index order whatever the number of workers. ``cache`` (a folder) keeps generated
    chunks of 50 images for later runs (the same seed and size give the same samples)."""
    images = np.empty((count, size, size, 3), np.uint8)
    boxes = np.zeros((count, MAX_OBJECTS, 4), np.float32)
    labels = np.full((count, MAX_OBJECTS), -1, np.int64)
    chunk = 50
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
    jobs = [(seed, s, min(s + chunk, count), size, str(cache) if cache else None) for s in range(0, count, chunk)]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workers > 1:
            import multiprocessing as mp

            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")))
            chunks = pool.map(_make_chunk, jobs)
        else:
            chunks = map(_make_chunk, jobs)
        for n, (job, samples) in enumerate(zip(jobs, chunks, strict=True)):
            for j, (im, b, lab) in enumerate(samples):
                images[job[1] + j] = im
                boxes[job[1] + j, : len(b)] = b
                labels[job[1] + j, : len(lab)] = lab
            if (n + 1) % 20 == 0:
                log(f"data     {job[2]}/{count} images ({time.perf_counter() - t0:.0f}s)")
    return images, boxes, labels


def augment(imgs, boxes, gen):
    """Random flips and transposes of square images (B, 3, S, S) and their xyxy boxes (B, M, 4)."""
    import torch

    b, _, s, _ = imgs.shape
    ops = torch.randint(0, 8, (b,), generator=gen)
    imgs, boxes = imgs.clone(), boxes.clone()
    for i in range(b):
        op = int(ops[i])
        x1, y1, x2, y2 = boxes[i].unbind(-1)
        if op & 1:  # horizontal flip
            imgs[i] = imgs[i].flip(-1)
            x1, x2 = s - x2, s - x1
        if op & 2:  # vertical flip
            imgs[i] = imgs[i].flip(-2)
            y1, y2 = s - y2, s - y1
        if op & 4:  # transpose
            imgs[i] = imgs[i].transpose(-1, -2).clone()
            x1, y1, x2, y2 = y1, x1, y2, x2
        boxes[i] = torch.stack([x1, y1, x2, y2], -1)
    return imgs, boxes


class EMA:
    """Exponential moving average of a model's weights and buffers (decay ramps up, as in YOLOv5)."""

    def __init__(self, model, decay: float = 0.998, tau: float = 250.0) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    def update(self, model) -> None:
        import torch

        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        with torch.no_grad():
            msd = model.state_dict()
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
                else:
                    v.copy_(msd[k])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export train",
        description="Train the shapes detector (ShapesDetector) on synthetic data, on the CPU, from a seed.",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the data, the initial weights and the order")
    p.add_argument("--out", type=Path, default=Path("models/shapes_detector.pt"), help="checkpoint to write")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--images", type=int, default=6000, help="training images (generated once, kept in memory)")
    p.add_argument("--batch", type=int, default=8, help="images per step, over all processes")
    p.add_argument("--lr", type=float, default=2.5e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=500, help="warm-up iterations")
    p.add_argument("--width", type=int, default=16, help="ShapesDetector width")
    p.add_argument("--size", type=int, default=320, help="input size (square, letterboxed)")
    p.add_argument("--workers", type=int, default=2, help="processes generating the data")
    p.add_argument(
        "--procs",
        type=int,
        default=2,
        help="data-parallel training processes, each on batch/procs images (default 2; the result depends on it)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    p.add_argument("--val-images", type=int, default=100, help="quick-validation images (0: none)")
    p.add_argument("--val-every", type=int, default=2, help="validate and save every N epochs")
    p.add_argument("--log-every", type=int, default=25, help="print a progress line every N iterations")
    p.add_argument(
        "--scales",
        default="256,288,320",
        help="comma-separated input sizes (multiples of 32) drawn per step before the last --final-epochs: "
        "the batch is resized down, which is cheaper (default 256,288,320; '' for --size only)",
    )
    p.add_argument("--final-epochs", type=int, default=2, help="epochs at --size only, at the end (with --scales)")
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--cache", type=Path, help="folder keeping the generated training images for later runs")
    return p


#: What each earlier run keeps in a fine-tuned checkpoint's ``meta["history"]``.
HISTORY_KEYS = ("command", "seed", "epochs", "train_images", "train_seconds", "torch", "procs", "threads")


def init_history(init_meta: dict) -> list[dict]:
    """``meta["history"]`` for a run started from a checkpoint whose meta is ``init_meta``.

    The starting checkpoint's own history, then its run: the last entry is the run that wrote the
    ``--init`` checkpoint. A checkpoint not made by ``attn-export train`` (no ``command``) adds an
    entry that says so, so the recipe never looks complete when it is not.
    """
    earlier = [dict(h) for h in init_meta.get("history", [])]
    if "command" not in init_meta:
        return [*earlier, {"command": None, "note": "weights from a checkpoint not written by attn-export train"}]
    return [*earlier, {k: init_meta[k] for k in HISTORY_KEYS if k in init_meta}]


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.batch % args.procs or args.procs < 1:
        print("attn-export train: error: --batch must be a multiple of --procs", file=sys.stderr)
        return 2
    import torch

    from attn_export.shapes.evaluate import validation_set

    t_start = time.perf_counter()
    _log(
        f"train    seed {args.seed}, {args.images} images x {args.epochs} epochs, batch {args.batch} over "
        f"{args.procs} process(es) x {args.threads} thread(s), torch {torch.__version__}"
    )
    images, boxes, labels = build_dataset(args.seed, args.images, args.size, args.workers, _log, args.cache)
    _log(f"data     {args.images} training images in {time.perf_counter() - t_start:.0f}s")
    val = validation_set(args.seed + VAL_SEED_OFFSET, args.val_images) if args.val_images else None
    data = (torch.from_numpy(images), torch.from_numpy(boxes), torch.from_numpy(labels))
    if args.procs == 1:
        _train(0, 1, args, argv, data, val, t_start, None)
        return 0
    import tempfile

    import torch.multiprocessing as mp

    for t in data:
        t.share_memory_()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{tmp}/rendezvous"
        mp.spawn(_train, args=(args.procs, args, argv, data, val, t_start, store), nprocs=args.procs, join=True)
    return 0


def _train(rank, world, args, argv, data, val, t_start, store) -> None:
    """One data-parallel process: the same initial weights everywhere, gradients averaged every step."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from attn_export.blocks.detector import ShapesDetector
    from attn_export.export import load_model, save_checkpoint
    from attn_export.shapes.evaluate import evaluate, torch_predictor
    from attn_export.shapes.loss import DetectionLoss

    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    log = _log if rank == 0 else (lambda msg: None)
    torch.manual_seed(args.seed)
    imgs_t, boxes_t, labels_t = data
    kwargs = {"num_classes": len(CLASSES), "width": args.width, "input_size": args.size}
    model = ShapesDetector(**kwargs)
    history: list[dict] = []  # the runs that produced --init, oldest first: the whole recipe in the meta
    if args.init:
        start = load_model(args.init)
        model.load_state_dict(start.model.state_dict())
        history = init_history(start.meta)
    ema = EMA(model)
    params = list(model.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 and "weight" in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
    )
    steps_per_epoch = args.images // args.batch
    total = steps_per_epoch * args.epochs
    warmup = min(args.warmup, total // 4)

    def lr_at(it: int) -> float:
        if it < warmup:
            return args.lr * (it + 1) / warmup
        t = (it - warmup) / max(1, total - warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    criterion = DetectionLoss()
    order_gen = torch.Generator().manual_seed(args.seed)  # the same order in every process
    aug_gen = torch.Generator().manual_seed(args.seed * 1009 + rank + 1)
    size_gen = torch.Generator().manual_seed(args.seed + 17)  # the same sizes in every process
    scales = [int(v) for v in args.scales.split(",") if v.strip()]
    metrics: dict = {}
    it = 0
    t_train = time.perf_counter()

    def validate_and_save(epoch: int) -> None:
        nonlocal metrics
        if val is not None:
            metrics = evaluate(torch_predictor(ema.model), val[0], val[1], args.size, 16)
            per = ", ".join(f"{k} {v['AP50']:.3f}" for k, v in metrics["per_class"].items())
            log(f"val      epoch {epoch}: mAP@0.5 {metrics['mAP50']:.4f} mAP@0.5:0.95 {metrics['mAP50_95']:.4f}")
            log(f"val      AP@0.5 per class: {per}")
        meta = {
            "classes": list(CLASSES),
            "task": "attn-export synthetic shapes (attn_export.shapes.data)",
            "seed": args.seed,
            "epochs": epoch,
            "epochs_planned": args.epochs,
            "train_images": args.images,
            "batch": args.batch,
            "procs": world,
            "threads": args.threads,
            "command": "attn-export train " + " ".join(argv),
            "history": history,
            "train_seconds": round(time.perf_counter() - t_start, 1),
            "torch": str(torch.__version__),
            "quick_val": {
                "seed": args.seed + VAL_SEED_OFFSET,
                "images": args.val_images,
                **{k: metrics[k] for k in ("mAP50", "mAP50_95") if k in metrics},
            },
            "input": "RGB float in [0, 1], letterboxed (pad 114), (B, 3, S, S)",
            "output": "(B, N, 4 + C): x1, y1, x2, y2 in input pixels, then per-class sigmoid scores",
        }
        save_checkpoint(args.out, ema.model, "ShapesDetector", kwargs, (3, args.size, args.size), meta=meta)
        log(f"saved    {args.out} (epoch {epoch}, {time.perf_counter() - t_start:.0f}s)")

    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(args.images, generator=order_gen)
        t_epoch, seen = time.perf_counter(), 0
        run = torch.zeros(4, dtype=torch.float64)  # loss, cls, box, fg
        for step in range(steps_per_epoch):
            idx = order[step * args.batch : (step + 1) * args.batch][rank::world]
            x = imgs_t[idx].permute(0, 3, 1, 2).float().div_(255.0)
            gb = boxes_t[idx]
            gl = labels_t[idx]
            x, gb = augment(x, gb, aug_gen)
            if scales and epoch <= args.epochs - args.final_epochs:
                s = scales[int(torch.randint(len(scales), (1,), generator=size_gen))]
                if s != args.size:
                    x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
                    gb = gb * (s / args.size)
            for g in opt.param_groups:
                g["lr"] = lr_at(it)
            loss, parts = criterion(model.forward_raw(x), (gl, gb, gl >= 0))
            opt.zero_grad(set_to_none=False)
            loss.backward()
            stats = torch.tensor([float(loss.detach()), parts["cls"], parts["box"], parts["fg"]], dtype=torch.float64)
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                flat /= world
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad.copy_(flat[offset : offset + n].view_as(p))
                    offset += n
                dist.all_reduce(stats)
                stats /= world
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            ema.update(model)
            it += 1
            seen += args.batch
            run += stats
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                n = args.log_every if (step + 1) % args.log_every == 0 else (step + 1) % args.log_every
                rate = seen / (time.perf_counter() - t_epoch)
                r = (run / n).tolist()
                log(
                    f"epoch {epoch}/{args.epochs} it {step + 1}/{steps_per_epoch} loss {r[0]:.4f} "
                    f"(cls {r[1]:.4f} box {r[2]:.4f} fg/img {r[3]:.1f}) "
                    f"lr {lr_at(it):.2e} {rate:.1f} img/s, {time.perf_counter() - t_start:.0f}s"
                )
                run.zero_()
        if rank == 0 and (epoch % args.val_every == 0 or epoch == args.epochs):
            validate_and_save(epoch)
    log(
        f"done     {args.epochs} epochs in {time.perf_counter() - t_train:.0f}s training, "
        f"{time.perf_counter() - t_start:.0f}s in all; wrote {args.out}"
    )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
