"""The dynamic batcher on its own: batch formation, bounds, errors, cancellation, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from attn_export.serve.batching import Batcher, BatcherClosed, QueueFull
from attn_export.serve.metrics import ServeMetrics


class Recorder:
    """``infer`` that doubles its input and records each batch size; ``gate`` holds calls back."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a call has started (and may be held at the gate)
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        self.sizes.append(len(x))
        time.sleep(self.delay)
        return x * 2


async def started(rec: Recorder) -> None:
    """Wait until the worker is inside its first call (without blocking the event loop)."""
    assert await asyncio.get_running_loop().run_in_executor(None, rec.entered.wait, 10)


def item(v: float, k: int = 1) -> np.ndarray:
    return np.full((k, 2), v, np.float32)


def run(coro):
    return asyncio.run(coro)


def test_results_come_back_in_order_and_per_request():
    rec = Recorder()
    batcher = Batcher(rec, max_batch=4, max_wait_s=0.05, queue_size=64).start()

    async def main():
        outs = await asyncio.gather(*(batcher.submit(item(i, 1 + i % 3)) for i in range(10)))
        return outs

    outs = run(main())
    batcher.close()
    for i, results in enumerate(outs):
        assert len(results) == 1 + i % 3
        for r in results:
            np.testing.assert_array_equal(r.output, np.full(2, 2.0 * i))
            assert 1 <= r.batch_size <= 4 and r.queued_s >= 0 and r.infer_s >= 0
    assert sum(rec.sizes) == sum(1 + i % 3 for i in range(10))
    assert max(rec.sizes) == 4  # 20 images arriving together fill batches
    assert rec.threads == {"attn-export-batcher"}  # never the event loop's thread


def test_a_lone_request_waits_at_most_max_wait():
    rec = Recorder()
    batcher = Batcher(rec, max_batch=8, max_wait_s=0.05).start()

    async def main():
        t0 = time.perf_counter()
        await batcher.submit(item(1))
        return time.perf_counter() - t0

    took = run(main())
    batcher.close()
    assert rec.sizes == [1] and 0.04 < took < 1.0


def test_no_wait_when_max_wait_is_zero():
    rec = Recorder()
    batcher = Batcher(rec, max_batch=8, max_wait_s=0.0).start()
    t0 = time.perf_counter()
    run(batcher.submit(item(1)))
    batcher.close()
    assert time.perf_counter() - t0 < 0.5


def test_images_queue_while_the_model_runs_so_batches_grow():
    rec = Recorder()
    rec.gate.clear()
    metrics = ServeMetrics()
    batcher = Batcher(rec, max_batch=8, max_wait_s=0.0, metrics=metrics).start()

    async def main():
        first = asyncio.ensure_future(batcher.submit(item(0)))
        await started(rec)  # the first call is running; the next 8 queue up behind it
        rest = asyncio.gather(*(batcher.submit(item(i)) for i in range(1, 9)))
        await asyncio.sleep(0.05)
        rec.gate.set()
        return [await first, *(await rest)]

    run(main())
    batcher.close()
    assert rec.sizes == [1, 8]
    text = metrics.render().decode()
    assert "attn_export_batch_size_count 2.0" in text and "attn_export_batch_size_sum 9.0" in text
    assert "attn_export_queue_depth 0.0" in text


def test_queue_bound_refuses_at_once():
    rec = Recorder()
    rec.gate.clear()  # the worker blocks in its first call
    batcher = Batcher(rec, max_batch=2, max_wait_s=0.0, queue_size=4).start()

    async def main():
        first = asyncio.ensure_future(batcher.submit(item(0, 2)))  # taken by the worker, stuck
        await started(rec)
        queued = asyncio.ensure_future(batcher.submit(item(1, 4)))  # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="queue size of 4"):
            await batcher.submit(item(2))
        assert batcher.depth == 4
        rec.gate.set()
        return await first, await queued

    first, queued = run(main())
    batcher.close()
    assert len(first) == 2 and len(queued) == 4


def test_inference_errors_reach_the_requests_and_the_worker_goes_on():
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x

    batcher = Batcher(flaky, max_batch=4, max_wait_s=0.0).start()

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(item(1))
        return await batcher.submit(item(2))

    (r,) = run(main())
    batcher.close()
    assert r.output[0] == 2


def test_wrong_output_length_is_an_error():
    batcher = Batcher(lambda x: x[:1], max_batch=4, max_wait_s=0.01).start()
    with pytest.raises(RuntimeError, match="1 results for a batch of 3"):
        run(batcher.submit(item(1, 3)))
    batcher.close()


def test_cancelled_requests_are_skipped():
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec, max_batch=1, max_wait_s=0.0).start()

    async def main():
        first = asyncio.ensure_future(batcher.submit(item(0)))
        await started(rec)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(item(1, 3)), 0.05)  # gives up while queued
        rec.gate.set()
        await first
        return await batcher.submit(item(2))

    run(main())
    batcher.close()
    assert rec.sizes == [1, 1]  # the 3 abandoned images never ran


def test_close_drains_queued_images_then_refuses():
    rec = Recorder(delay=0.02)
    batcher = Batcher(rec, max_batch=2, max_wait_s=0.0).start()

    async def main():
        pending = [asyncio.ensure_future(batcher.submit(item(i))) for i in range(6)]
        await asyncio.sleep(0)  # all six queued
        closer = asyncio.get_running_loop().run_in_executor(None, batcher.close)
        results = await asyncio.gather(*pending)
        assert await closer is True
        with pytest.raises(BatcherClosed):
            await batcher.submit(item(9))
        return results

    results = run(main())
    assert [r[0].output[0] for r in results] == [2.0 * i for i in range(6)]
    assert sum(rec.sizes) == 6


def test_close_without_drain_fails_queued_images():
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec, max_batch=1, max_wait_s=0.0).start()

    async def main():
        first = asyncio.ensure_future(batcher.submit(item(0)))
        await started(rec)
        queued = asyncio.ensure_future(batcher.submit(item(1)))
        await asyncio.sleep(0.01)
        batcher.close(drain=False, timeout=0)
        with pytest.raises(BatcherClosed):
            await queued
        rec.gate.set()
        await first

    run(main())
    assert batcher.close(timeout=5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        Batcher(lambda x: x, max_batch=0)
