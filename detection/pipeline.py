"""The one detection pipeline: image bytes -> decode within a pixel budget -> batch and infer ->
post-process (NMS, boxes back to original pixels) -> an answer.

Every protocol runs it: ``/detect``, the Open Inference Protocol over HTTP and gRPC (through the
service's :class:`Pipeline`, whose inference is its micro-batcher) and the Triton Python-backend model
(the same steps, with Triton's dynamic batcher in front).

- :func:`decode_all` reads every image header first (type, size, limits), reserves the images' pixels on
  a :class:`PixelBudget` (the caller's: the service's admission door), then decodes and letterboxes the
  images one after another; the budget is given back once they are decoded.
- :func:`stack` makes the batch of a request's images; :func:`detections` post-processes the network's
  rows of them; :func:`answer` packs those as the contract's output tensors.
- :class:`Pipeline` chains the steps for one request, with the CPU work and the inference as hooks.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from attn_export.detection.contract import Params, pack
from attn_export.detection.imaging import Decoded, InputError, decode_image, open_image
from attn_export.detection.postprocess import PAD_VALUE, postprocess


class PixelBudget(Protocol):
    """Where the pixels of the images being decoded are reserved (the serve door's ticket)."""

    def reserve_pixels(self, n: int) -> None: ...

    def release_pixels(self) -> None: ...


@dataclass(frozen=True)
class Limits:
    """The letterbox size and the largest image to decode."""

    size: int
    max_pixels: int = 40_000_000
    max_side: int = 20_000
    stride: int | None = None  # set: the rectangular letterbox (a graph with free height and width)
    min_side: int = 0  # the rect letterbox's shortest side (the graph's smallest verified size)


def who(i: int, name: str | None, count: int) -> str | None:
    """How an error names image ``i`` of ``count`` (None for a lone image without a name)."""
    if count > 1 or name:
        return f"image {i}" + (f" ({name!r})" if name else "")
    return None


def _naming(e: InputError, i: int, name: str | None, count: int) -> InputError:
    label = who(i, name, count)
    return InputError(e.status, e.kind, f"{label}: {e.message}") if label else e


@dataclass
class Decoding:
    """A request's decoded images, the seconds spent reading their headers and decoding each."""

    decoded: list[Decoded]
    open_s: float
    decode_s: list[float]


def decode_all(
    images: Sequence[bytes],
    limits: Limits,
    *,
    names: Sequence[str | None] | None = None,
    budget: PixelBudget | None = None,
    keep_full: bool = False,
) -> Decoding:
    """Decode and letterbox ``images`` within ``limits``; their pixels are held on ``budget`` meanwhile.

    :class:`InputError` (naming the image when there are several, or it has a name) for an image the
    service refuses; whatever ``budget.reserve_pixels`` raises past its bound, before anything is decoded.
    """
    t0 = time.perf_counter()
    count = len(images)
    names = names if names is not None else [None] * count
    opened: list[Any] = []
    for i, data in enumerate(images):
        try:
            opened.append(open_image(data, limits.max_pixels, limits.max_side))
        except InputError as e:
            raise _naming(e, i, names[i], count) from e
    open_s = time.perf_counter() - t0
    if budget is not None:
        budget.reserve_pixels(sum(img.size[0] * img.size[1] for img in opened))
    decoded, times = [], []
    try:
        for i, img in enumerate(opened):
            t = time.perf_counter()
            try:
                decoded.append(
                    decode_image(img, limits.size, keep_full=keep_full, stride=limits.stride, min_side=limits.min_side)
                )
            except InputError as e:
                raise _naming(e, i, names[i], count) from e
            opened[i] = None  # its pixels go with it
            times.append(time.perf_counter() - t)
    finally:
        if budget is not None:
            budget.release_pixels()
    return Decoding(decoded, open_s, times)


def pad_stack(pixels: Sequence[np.ndarray], value: int = PAD_VALUE) -> np.ndarray:
    """Images (3, h, w) as one batch (K, 3, H, W), each padded at the bottom and right to the largest
    height and width with ``value`` (so a box's input coordinates do not move)."""
    if all(p.shape == pixels[0].shape for p in pixels):
        return np.stack(pixels)
    h = max(p.shape[-2] for p in pixels)
    w = max(p.shape[-1] for p in pixels)
    out = np.full((len(pixels), *pixels[0].shape[:-2], h, w), value, pixels[0].dtype)
    for i, p in enumerate(pixels):
        out[i, ..., : p.shape[-2], : p.shape[-1]] = p
    return out


def stack(decoded: Sequence[Decoded]) -> np.ndarray:
    """The batch (K, 3, H, W) uint8 of ``decoded`` (rect letterboxes of several shapes padded to the largest,
    :func:`pad_stack`); the images no longer hold their own pixels."""
    batch = pad_stack([d.pixels for d in decoded])
    for d in decoded:
        d.pixels = None
    return batch


def take_pixels(decoded: Sequence[Decoded]) -> list[np.ndarray]:
    """The images' pixels (3, h, w) uint8, one array each (their shapes may differ: the batcher groups or
    pads them); the images no longer hold them."""
    out = [d.pixels for d in decoded]
    for d in decoded:
        d.pixels = None
    return out


def detections(
    preds: np.ndarray | Sequence[np.ndarray], decoded: Sequence[Decoded], params: Params
) -> list[tuple[np.ndarray, ...]]:
    """Network rows (N, 4 + C) of ``decoded`` images (one array (K, N, 4 + C), or one row each, whose N
    may differ) -> per image ``(boxes in original pixels, scores, class ids)``."""
    if isinstance(preds, np.ndarray):
        dets = postprocess(preds, conf=params.conf, iou=params.iou, max_det=params.max_det)
    else:
        dets = [postprocess(p, conf=params.conf, iou=params.iou, max_det=params.max_det)[0] for p in preds]
    return [(d.to_original(b), s, c) for d, (b, s, c) in zip(decoded, dets, strict=True)]


def answer(
    preds: np.ndarray | Sequence[np.ndarray], decoded: Sequence[Decoded], params: Params, max_det: int
) -> dict[str, np.ndarray]:
    """The contract's output tensors for the network rows of ``decoded`` images."""
    return pack(detections(preds, decoded, params), max_det)


@dataclass
class Detected:
    """One request through the pipeline: its images, their inference results and detections, and the
    seconds of each stage (``decode``, ``decode_wait``, ``queue`` and ``inference``: the longest of the
    images, ``postprocess_wait``, ``postprocess``: NMS, ``postprocess_work``: with the answer)."""

    decoding: Decoding
    results: list  # per image, what the inference hook gave (``output``: the network's row, ``queued_s``, ``infer_s``)
    dets: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


#: ``run_cpu(fn, *args) -> (fn(*args), seconds waiting for a thread, seconds working)``
RunCpu = Callable[..., Awaitable[tuple[Any, float, float]]]


class Pipeline:
    """Decode within the pixel budget -> batch/infer -> post-process -> answer, for one request at a time.

    ``run_cpu`` runs the decoding and the post-processing off the caller's thread (the service's CPU
    pool); ``infer`` runs K images (3, h, w) uint8 and returns K results, each with its ``output`` row,
    ``queued_s`` and ``infer_s`` (the service's micro-batcher, which batches them with other requests' images).
    """

    def __init__(
        self, limits: Limits, run_cpu: RunCpu, infer: Callable[[Sequence[np.ndarray]], Awaitable[list]]
    ) -> None:
        self.limits = limits
        self.run_cpu = run_cpu
        self.infer = infer

    async def run(
        self,
        images: Callable[[], tuple[Sequence[bytes], Sequence[str | None] | None]],
        params: Params,
        reply: Callable[[Detected], Any],
        *,
        budget: PixelBudget | None = None,
        keep_full: bool = False,
    ) -> tuple[Any, Detected]:
        """``(reply(detected), detected)``: ``images()`` gives the images and their names (it runs with the
        decoding, so parsing the request stays off the caller's thread too); ``reply`` makes the answer of
        the detections, on the CPU pool as well."""

        def prepare() -> Decoding:
            data, names = images()
            return decode_all(data, self.limits, names=names, budget=budget, keep_full=keep_full)

        decoding, decode_wait, decode_work = await self.run_cpu(prepare)
        results = await self.infer(take_pixels(decoding.decoded))
        timing = {
            "decode": decode_work,
            "decode_wait": decode_wait,
            "queue": max(r.queued_s for r in results),
            "inference": max(r.infer_s for r in results),
        }
        detected = Detected(decoding, results, timing=timing)

        def finish(t_submit: float) -> Any:
            t_start = time.perf_counter()
            detected.dets = detections([r.output for r in results], decoding.decoded, params)
            detected.timing |= {"postprocess_wait": t_start - t_submit, "postprocess": time.perf_counter() - t_start}
            return reply(detected)

        out, post_wait, post_work = await self.run_cpu(finish, time.perf_counter())
        detected.timing |= {"postprocess_wait": post_wait, "postprocess_work": post_work}
        return out, detected
