"""Dynamic batching: images submitted together run through the model in one call.

A :class:`Batcher` owns one worker thread and a bounded queue. :meth:`Batcher.submit` (a coroutine,
called on the event loop) enqueues a request's images and awaits their results; it never blocks the
loop. The worker takes the oldest image, then keeps taking images until it holds ``max_batch`` of them
or the oldest has waited ``max_wait_s``, stacks them into one array and calls the model once. Under
load the queue is never empty when a call ends, so batches fill up without waiting: throughput grows
with concurrency, while a lone request waits at most ``max_wait_s`` extra.

Images of several shapes (the rectangular letterbox of a graph with free height and width) are batched
by ``shapes``: ``"group"`` runs only images of one shape together (the oldest image's; the others wait,
in order, for a later batch, at most ``max_wait_s`` past their own arrival before they run anyway),
``"pad"`` pads a batch to its largest height and width with the letterbox grey, at the bottom and right,
so no box moves. docs/serving.md gives the measurements that chose the default.

The queue holds at most ``queue_size`` images; a request that does not fit is refused at once
(:class:`QueueFull`, an HTTP 503), so a flood of requests cannot exhaust memory. :meth:`Batcher.close`
stops taking requests and, by default, finishes every image already queued (shutdown drains).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from attn_export.detection.pipeline import pad_stack

#: how images of different shapes share a batch (see the module docstring)
SHAPE_POLICIES = ("group", "pad")
DEFAULT_SHAPES = "group"

log = logging.getLogger("attn_export.serve")


class QueueFull(RuntimeError):
    """The batching queue has no room for the request's images."""


class BatcherClosed(RuntimeError):
    """The batcher no longer takes images (the server is shutting down)."""


@dataclass(frozen=True)
class BatchResult:
    """One image's model output, and how it got there."""

    output: np.ndarray  # this image's row of the batch output, e.g. (N, 4 + C)
    queued_s: float  # from submit to the start of its batch's inference
    infer_s: float  # the batch's inference call
    batch_size: int  # images in that call


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    t_submit: float


_STOP = object()


def _resolve(fut: asyncio.Future, value=None, exc: BaseException | None = None) -> None:
    if fut.done():  # cancelled: the client went away or timed out
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class Batcher:
    """Batches single images (C, H, W) into ``infer`` calls on (B, C, H, W); one worker thread."""

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        queue_size: int = 128,
        metrics=None,
        name: str = "attn-export-batcher",
        shapes: str = DEFAULT_SHAPES,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("Batcher: max_batch and queue_size must be >= 1 and max_wait_s >= 0")
        if shapes not in SHAPE_POLICIES:
            raise ValueError(f"Batcher: shapes must be one of {', '.join(SHAPE_POLICIES)}, not {shapes!r}")
        self.shapes = shapes
        self._drain = True
        self._held: deque[_Item] = deque()  # the worker's: images of another shape than the batch it formed
        self._infer = infer
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.queue_size = int(queue_size)
        self._metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batches = 0  # inference calls made
        self.images = 0  # images inferred

    # -- the event-loop side -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Images queued and not yet taken into a batch."""
        return self._pending

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> Batcher:
        self._thread.start()
        return self

    async def submit(self, images: np.ndarray | Sequence[np.ndarray]) -> list[BatchResult]:
        """Queue ``images`` ((K, C, H, W), or K arrays (C, h, w) of any shapes) and wait for their K results,
        in order."""
        loop = asyncio.get_running_loop()
        k = len(images)
        with self._lock:
            if self._closed:
                raise BatcherClosed("the server is shutting down and takes no new images")
            if self._pending + k > self.queue_size:
                raise QueueFull(
                    f"the server is busy: {self._pending} images are queued, {k} more would pass "
                    f"the queue size of {self.queue_size}; retry shortly"
                )
            self._pending += k
            now = time.perf_counter()
            futures = [loop.create_future() for _ in range(k)]
            for image, fut in zip(images, futures, strict=True):
                self._queue.put(_Item(image, fut, loop, now))
        self._set_depth()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for fut in futures:  # the worker skips the images of a request that gave up
                fut.cancel()
            raise

    def close(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Take no more images; finish the queued ones (``drain``) or fail them. True once the worker ended."""
        with self._lock:
            already = self._closed
            self._closed = True
        if not already:
            self._drain = drain
            if not drain:
                self._fail_queued(BatcherClosed("the server shut down before this image ran"))
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker thread ---------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._pending)

    def _fail_queued(self, exc: BaseException) -> None:
        items = []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._queue.get_nowait())
        for item in items:
            if item is not _STOP:
                self._post(item, exc=exc)
        with self._lock:
            self._pending -= sum(1 for i in items if i is not _STOP)
        self._set_depth()

    @staticmethod
    def _post(item: _Item, value=None, exc: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            item.loop.call_soon_threadsafe(_resolve, item.future, value, exc)

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch, stop = [first], False
        deadline = first.t_submit + self.max_wait_s
        group = self.shapes == "group"
        shape = first.image.shape
        if group and self._held:  # held images of this shape first, oldest first
            others: deque[_Item] = deque()
            while self._held:
                it = self._held.popleft()
                (batch if it.image.shape == shape and len(batch) < self.max_batch else others).append(it)
            self._held = others
        while len(batch) < self.max_batch:
            wait = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            if group and item.image.shape != shape:
                self._held.append(item)
                continue
            batch.append(item)
        return batch, stop

    def _next(self) -> _Item | object:
        """The oldest image: a held one (it came before anything still queued), else the queue's next."""
        return self._held.popleft() if self._held else self._queue.get()

    def _run(self) -> None:
        stop = False
        while not stop or self._held:
            first = self._held.popleft() if stop else self._next()
            if first is _STOP:
                break
            if stop and not self._drain:
                self._post(first, exc=BatcherClosed("the server shut down before this image ran"))
                with self._lock:
                    self._pending -= 1
                continue
            if stop:  # draining the held images after the stop: no new ones come
                batch = [first]
                while self._held and len(batch) < self.max_batch and self._held[0].image.shape == first.image.shape:
                    batch.append(self._held.popleft())
            else:
                batch, stop = self._collect(first)
            with self._lock:
                self._pending -= len(batch)
            self._set_depth()
            live = [it for it in batch if not it.future.cancelled()]
            if live:
                self._run_batch(live)

    def _run_batch(self, items: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            out = self._infer(pad_stack([it.image for it in items]))
            if len(out) != len(items):
                raise RuntimeError(f"the model returned {len(out)} results for a batch of {len(items)} images")
        except Exception as e:  # the requests get the error; the worker goes on
            log.exception("inference failed for a batch of %d images", len(items))
            for it in items:
                self._post(it, exc=e)
            return
        t1 = time.perf_counter()
        n = len(items)
        self.batches += 1
        self.images += n
        if self._metrics is not None:
            self._metrics.batch_size.observe(n)
            self._metrics.stage.labels("inference").observe(t1 - t0)
            for it in items:
                self._metrics.queue_wait.observe(t0 - it.t_submit)
        for i, it in enumerate(items):
            self._post(it, BatchResult(out[i], t0 - it.t_submit, t1 - t0, n))
