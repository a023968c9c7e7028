"""The torch runner: the shared fuse step, batch sizes for CUDA graphs and the padding around them.

The padding logic runs on the CPU with a plain function in place of a CUDA graph; the real capture
runs only where a GPU is visible (``gpu`` marker).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attn_export.blocks.detector import ShapesDetector
from attn_export.runtime.runners import StaticBatches, TorchRunner, batch_chunks, graph_batch_sizes
from attn_export.serve.cli import parser, settings_from_args
from attn_export.serve.settings import Settings

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shapes_detector.pt"


@pytest.mark.parametrize(
    ("max_batch", "sizes"),
    [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 4)), (12, (1, 2, 4, 8, 12)), (16, (1, 2, 4, 8, 16))],
)
def test_graph_batch_sizes(max_batch, sizes):
    assert graph_batch_sizes(max_batch) == sizes


def test_graph_batch_sizes_refuses_zero():
    with pytest.raises(ValueError, match="max_batch"):
        graph_batch_sizes(0)


def test_batch_chunks_pick_the_smallest_size_that_holds_the_batch():
    sizes = (1, 2, 4, 8, 12)
    for n in range(1, 40):
        chunks = batch_chunks(n, sizes)
        # contiguous, cover 0..n, every chunk fits its size, only the last is partial
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        for (_, stop, _), (start, _, _) in itertools.pairwise(chunks):
            assert stop == start
        for start, stop, size in chunks[:-1]:
            assert stop - start == size == 12
        start, stop, size = chunks[-1]
        assert size == min(s for s in sizes if s >= stop - start)
    assert batch_chunks(3, sizes) == [(0, 3, 4)]
    assert batch_chunks(13, sizes) == [(0, 12, 12), (12, 13, 1)]
    with pytest.raises(ValueError, match="at least one"):
        batch_chunks(0, sizes)


def _cpu_capture(model, calls):
    """A stand-in for a CUDA graph: replaying reruns the model on the static input in place."""

    def capture(static_in):
        static_out = model(static_in)

        def replay():
            calls.append(static_in.shape[0])
            static_out.copy_(model(static_in))

        return replay, static_out

    return capture


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return ShapesDetector().eval()


def test_static_batches_pad_and_slice(detector):
    calls: list[int] = []
    x = torch.rand(7, 3, 64, 64)
    with torch.inference_mode():
        ref = detector(x)
        batches = StaticBatches(_cpu_capture(detector, calls), (1, 2, 4), x[:1])
        calls.clear()
        for n in (1, 3, 7):
            (out,) = batches(x[:n])
            torch.testing.assert_close(out, ref[:n], rtol=1e-5, atol=1e-4)
    assert calls == [1, 4, 4, 4]  # 3 -> padded to 4; 7 -> 4 + 3 padded to 4
    # stale rows from the previous, larger batch were zeroed before the padded replay
    assert torch.count_nonzero(batches._entries[4][1][3:]) == 0


def test_torch_runner_prepares_a_copy(detector):
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    runner = TorchRunner(detector, ["input"], ["output"], prepare=True)
    assert runner.model is not detector
    assert not any(isinstance(m, nn.BatchNorm2d) for m in runner.model.stem.modules())  # folded
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        ref = detector(torch.from_numpy(x)).numpy()
    out = runner.infer({"input": x})["output"]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-4)
    assert all(torch.equal(v, before[k]) for k, v in detector.state_dict().items())


def test_torch_runner_in_bf16_returns_float32(detector):
    runner = TorchRunner(detector, ["input"], ["output"], dtype=torch.bfloat16)
    assert runner.dtype == torch.bfloat16 and "bfloat16" in runner.provider
    x = np.random.default_rng(1).random((1, 3, 64, 64), dtype=np.float32)
    out = runner.infer({"input": x})["output"]
    with torch.inference_mode():
        ref = detector(torch.from_numpy(x)).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., 4:], ref[..., 4:], atol=0.05)


def test_torch_runner_replays_captured_sizes_and_runs_other_shapes_eagerly(detector):
    runner = TorchRunner(detector, ["input"], ["output"], prepare=True)
    calls: list[int] = []
    with torch.inference_mode():
        runner.graphs = StaticBatches(_cpu_capture(runner.model, calls), (1, 2), torch.zeros(1, 3, 64, 64))
    calls.clear()
    assert runner.max_batch == 2
    rng = np.random.default_rng(2)
    x = rng.random((3, 3, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        ref = runner.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.infer({"input": x})["output"], ref, rtol=1e-5, atol=1e-4)
    assert calls == [2, 1]
    other = rng.random((1, 3, 96, 96), dtype=np.float32)  # not the captured input size
    assert runner.infer({"input": other})["output"].shape == (1, 12 * 12 + 6 * 6 + 3 * 3, 8)
    assert calls == [2, 1]


def test_cuda_graphs_need_a_cuda_device(detector):
    runner = TorchRunner(detector, ["input"], ["output"], cuda_graphs=True, input_shape=(3, 64, 64))
    assert runner.graphs is None and runner.max_batch is None and runner.notes == []


def test_cuda_graphs_switch(monkeypatch):
    assert Settings(model=None).cuda_graphs is True
    assert settings_from_args(parser().parse_args(["--no-cuda-graphs"])).cuda_graphs is False
    monkeypatch.setenv("ATTN_EXPORT_CUDA_GRAPHS", "false")
    assert settings_from_args(parser().parse_args([])).cuda_graphs is False


@pytest.mark.gpu
def test_cuda_graphs_on_a_gpu_match_eager():
    """The shipped detector captured at 1, 2, 4, 8 and 16 gives the eager answers at every batch size."""
    from attn_export.export import load_model

    loaded = load_model(SHIPPED)
    eager = TorchRunner(loaded.model, ["input"], ["output"], device="cuda", prepare=True)
    graphs = TorchRunner(
        loaded.model, ["input"], ["output"], device="cuda", prepare=True, cuda_graphs=True, input_shape=(3, 320, 320)
    )
    assert graphs.notes == [] and graphs.graphs is not None and graphs.max_batch == 16
    assert "CUDA graphs" in graphs.provider
    rng = np.random.default_rng(0)
    for n in (1, 3, 16, 20):
        x = rng.random((n, 3, 320, 320), dtype=np.float32)
        np.testing.assert_allclose(graphs.infer({"input": x})["output"], eager.infer({"input": x})["output"], atol=1e-3)
