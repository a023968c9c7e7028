"""The service object: settings, metrics, the model, its micro-batcher and CPU pool, the admission door
and the readiness state; :meth:`Service.detect` runs a request through the detection pipeline
(:mod:`attn_export.detection.pipeline`) with them. Every route and protocol answers from one."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import numpy as np

from attn_export.detection.contract import Params
from attn_export.detection.loader import ServedModel
from attn_export.detection.pipeline import Detected, Limits, Pipeline, PixelBudget
from attn_export.detection.postprocess import to_input
from attn_export.serve.batching import DEFAULT_SHAPES, Batcher, QueueFull
from attn_export.serve.door import Busy, Door, release_memory
from attn_export.serve.metrics import ServeMetrics
from attn_export.serve.settings import Settings

log = logging.getLogger("attn_export.serve")


class NoResult(RuntimeError):
    """A request waited longer than ``request_timeout_s`` for its results (504)."""


def default_max_batch(model: ServedModel) -> int:
    """4 on a CPU (per image, batches of 2 to 4 run fastest there: larger ones fall out of the caches),
    16 on a GPU."""
    return 4 if model.runner.device == "cpu" else 16


def _lower_priority(nice: int) -> None:
    """Run the calling thread at a lower priority (Linux: per-thread niceness), where allowed."""
    if nice > 0 and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class Service:
    """What an app holds: settings, metrics, the model and its batcher, and the readiness state.

    Decoding and post-processing run on a small thread pool of the service's own, at a lower priority
    than the inference threads: where CPUs are short (onnxruntime on the CPU uses every core), the
    model, the bottleneck, runs first and the pre-processing of the next requests fills its gaps,
    instead of stalling its parallel sections.
    """

    def __init__(self, settings: Settings, loader: Callable[[Settings], ServedModel]) -> None:
        self.settings = settings
        self.loader = loader
        self.metrics = ServeMetrics()
        self.model: ServedModel | None = None
        self.batcher: Batcher | None = None
        self.pipeline: Pipeline | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.warm = False
        self.shutting_down = False
        self.known_paths: set[str] = set()
        self.grpc_port: int | None = None  # the gRPC port bound, when it runs
        self._warm_task: asyncio.Task | None = None
        self.door = Door(
            settings.max_in_flight or 4 * (settings.max_batch or 4),  # set again once the model's max batch is known
            settings.max_bytes_in_flight,
            settings.max_pixels_in_flight,
            max_retry_after_s=settings.max_retry_after_s,
        )
        self._pool_waiting = 0
        self._last_release = 0.0
        self._releasing = False

    @property
    def ready(self) -> bool:
        return self.model is not None and self.warm and not self.shutting_down

    def not_ready_reason(self) -> str:
        return "shutting down" if self.shutting_down else ("warming up" if self.model else "loading the model")

    async def run_cpu(self, fn, *args):
        """``fn(*args)`` on the service's CPU pool, awaited without blocking the event loop."""
        return (await self.run_cpu_timed(fn, *args))[0]

    async def run_cpu_timed(self, fn, *args) -> tuple[Any, float, float]:
        """``(fn(*args), seconds waiting for a pool thread, seconds working)`` on the CPU pool (the
        ``cpu_pool_backlog`` gauge counts the tasks queued or running there)."""
        t_submit = time.perf_counter()
        times = [t_submit, t_submit]
        self._pool_waiting += 1
        self.metrics.pool_backlog.set(self._pool_waiting)

        def job():
            times[0] = time.perf_counter()
            try:
                return fn(*args)
            finally:
                times[1] = time.perf_counter()

        try:
            result = await asyncio.get_running_loop().run_in_executor(self.pool, job)
        finally:
            self._pool_waiting -= 1
            self.metrics.pool_backlog.set(self._pool_waiting)
        return result, times[0] - t_submit, times[1] - times[0]

    async def _infer(self, batch: np.ndarray | Sequence[np.ndarray]) -> list:
        """The images through the micro-batcher, with every other request's images; a full queue is a
        :class:`Busy` (``queue``), no answer within ``request_timeout_s`` a :class:`NoResult`."""
        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(self.batcher.submit(batch), timeout)
        except QueueFull as e:
            self.metrics.queue_full.inc()
            raise Busy("queue", str(e), self.door.retry_after()) from e
        except asyncio.TimeoutError as e:
            raise NoResult(f"no result within {timeout:g} s") from e

    async def detect(
        self,
        images: Callable[[], tuple[Sequence[bytes], Sequence[str | None] | None]],
        params: Params,
        reply: Callable[[Detected], Any],
        *,
        budget: PixelBudget | None = None,
        keep_full: bool = False,
    ) -> tuple[Any, Detected]:
        """One request through the detection pipeline (:meth:`Pipeline.run`), counted in the service's metrics."""
        out, detected = await self.pipeline.run(images, params, reply, budget=budget, keep_full=keep_full)
        m, timing = self.metrics, detected.timing
        m.wait.labels("decode").observe(timing["decode_wait"])
        for sec in detected.decoding.decode_s:
            m.stage.labels("decode").observe(sec)
        m.wait.labels("inference").observe(timing["queue"])
        m.wait.labels("postprocess").observe(timing["postprocess_wait"])
        m.stage.labels("postprocess").observe(timing["postprocess"])
        m.images.inc(len(detected.decoding.decoded))
        m.detections.inc(sum(len(scores) for _, scores, _ in detected.dets))
        return out, detected

    def on_idle(self) -> None:
        """The door has nothing in flight: hand freed memory back to the system (at most once a second)."""
        now = time.monotonic()
        if not self.settings.release_memory or self._releasing or now - self._last_release < 1.0:
            return
        self._releasing = True
        self._last_release = now

        def trim():
            try:
                if release_memory():
                    self.metrics.memory_releases.inc()
            finally:
                self._releasing = False

        threading.Thread(target=trim, name="attn-export-trim", daemon=True).start()

    async def start(self) -> None:
        s = self.settings
        threads = s.cpu_threads or min(4, max(2, os.cpu_count() or 1))
        self.pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="attn-export-cpu", initializer=_lower_priority, initargs=(s.cpu_nice,)
        )
        self.model = model = await anyio.to_thread.run_sync(self.loader, s)
        stride = model.stride if model.rect else None  # the rectangular letterbox where the graph allows it
        limits = Limits(model.input_size, s.max_pixels, s.max_side, stride, model.min_side if model.rect else 0)
        self.pipeline = Pipeline(limits, self.run_cpu_timed, self._infer)
        max_batch = s.max_batch or default_max_batch(model)
        max_batch = min(max_batch, model.max_batch or max_batch)
        # enough requests in flight to fill the next batches while one runs, and no more: the rest get 503
        self.door.max_requests = s.max_in_flight or 4 * max_batch
        self.batcher = Batcher(
            lambda pixels: model.infer(to_input(pixels)),  # images queue as uint8, 4x smaller
            max_batch=max_batch,
            max_wait_s=s.max_wait_ms / 1000.0,
            queue_size=max(s.queue_size, s.max_images),
            metrics=self.metrics,
            shapes=getattr(s, "batch_shapes", None) or DEFAULT_SHAPES,
        ).start()
        self.metrics.model_info.labels(model.name, model.backend, model.provider).set(1)
        log.info(
            "serving %s on %s (%s): input %dx%d%s, %s head, classes %s, max batch %d",
            model.path, model.backend, model.provider, model.input_size, model.input_size,
            f" (rect: long side {model.input_size}, stride {model.stride})" if model.rect else "", model.head,
            ", ".join(model.class_names), max_batch,
        )  # fmt: skip
        if s.warmup:
            self._warm_task = asyncio.create_task(self._warmup(max_batch))
        else:
            self._set_warm()

    def _set_warm(self) -> None:
        self.warm = True
        self.metrics.ready.set(1 if self.ready else 0)

    async def _warmup(self, max_batch: int) -> None:
        size = self.model.input_size
        try:
            for n in sorted({1, max_batch}):
                await self.batcher.submit(np.zeros((n, 3, size, size), np.uint8))
        except Exception:  # a model that fails here fails the requests too; readiness stays down
            log.exception("warm-up failed")
            return
        self._set_warm()
        log.info("warmed up; ready")

    async def stop(self) -> None:
        self.shutting_down = True
        self.metrics.ready.set(0)
        if self._warm_task is not None:
            self._warm_task.cancel()
        if self.batcher is not None:
            timeout = self.settings.graceful_timeout_s
            await anyio.to_thread.run_sync(lambda: self.batcher.close(drain=True, timeout=timeout))
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            log.info("stopped after %d batches, %d images", self.batcher.batches, self.batcher.images)
