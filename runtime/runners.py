"""Runners: load a model once, then ``infer(dict[str, ndarray]) -> dict[str, ndarray]``.

The same small interface serves the verifier, the benchmark and the HTTP service (Polygraphy's
runner idea). Heavy optional backends (onnxruntime, TensorRT) are imported when a runner is built,
never at import of this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


class Runner:
    """Base runner: ``input_names``, ``output_names``, ``device``, ``provider`` and ``infer``."""

    name = "runner"
    input_names: list[str]
    output_names: list[str]
    device: str = "cpu"
    provider: str = ""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {missing}; expected {self.input_names}")

    def describe(self) -> str:
        return f"{self.name} ({self.provider or self.device})"


class OnnxRuntimeRunner(Runner):
    """onnxruntime, with the CUDA provider first when onnxruntime-gpu offers it."""

    name = "onnxruntime"

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
            options.add_session_config_entry(key, str(value))
        options.log_severity_level = 3  # errors only; ORT's optimizer notes are not the user's concern
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        src = str(model) if isinstance(model, (str, Path)) else model
        self.session = ort.InferenceSession(src, options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feeds(feeds)
        outs = self.session.run(self.output_names, {n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


class ReferenceRunner(Runner):
    """``onnx.reference.ReferenceEvaluator``: runs any graph on any machine, slowly (pure numpy).

    With ``new_ops=None`` it takes the numpy references of the attn-export plugin nodes, so a
    ``--target trt`` graph runs without TensorRT or a GPU.
    """

    name = "onnx.reference"

    def __init__(self, model, new_ops: Sequence[type] | None = None) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        if new_ops is None:
            from attn_export.plugins import reference_ops

            new_ops = reference_ops()
        if isinstance(model, bytes):
            model = onnx.load_model_from_string(model)
        elif isinstance(model, (str, os.PathLike)):
            model = onnx.load(str(model))
        self.session = ReferenceEvaluator(model, new_ops=list(new_ops))
        self.input_names = list(self.session.input_names)
        self.output_names = list(self.session.output_names)
        self.provider = f"ReferenceEvaluator (onnx {onnx.__version__})"

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feeds(feeds)
        outs = self.session.run(None, {n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


class PluginGraphRunner(Runner):
    """A ``--target trt`` graph on onnxruntime's CPU provider: every standard node by onnxruntime, every
    plugin node by its numpy reference (the code :class:`ReferenceRunner` runs), as an onnxruntime-extensions
    Python op (:func:`attn_export.plugins.reference.ort_plugin_graph`).

    ``cross_check=True``: the first call also runs the first item of its batch through the graph on
    :class:`ReferenceRunner` (ONNX's reference evaluator, the independent path) and on onnxruntime, and
    raises ``RuntimeError`` where an output differs by more than ``atol + rtol * |reference|``;
    ``cross_checked`` then holds ``{output: max abs difference}``.
    """

    name = "onnxruntime+numpy plugins"

    def __init__(
        self,
        model,
        threads: int | None = None,
        cross_check: bool = True,
        atol: float = 1e-4,
        rtol: float = 1e-3,
    ) -> None:
        import onnx
        import onnxruntime as ort

        from attn_export.plugins.reference import ort_plugin_graph, register_ort_kernels

        if isinstance(model, bytes):
            model = onnx.load_model_from_string(model)
        elif isinstance(model, (str, os.PathLike)):
            model = onnx.load(str(model))
        self._model = model
        library = register_ort_kernels()
        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.register_custom_ops_library(library)
        graph = ort_plugin_graph(model).SerializeToString()
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.provider = "CPUExecutionProvider, plugin nodes by their numpy references"
        self._pending_check = cross_check
        self._tol = (atol, rtol)
        self.cross_checked: dict[str, float] = {}

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))

    def _cross_check(self, feeds: Mapping[str, np.ndarray]) -> None:
        one = {n: np.asarray(feeds[n])[:1] for n in self.input_names}
        ref = ReferenceRunner(self._model).infer(one)
        try:
            got = self._run(one)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RuntimeError(
                f"cross-check: onnxruntime with the numpy plugin ops fails where onnx.reference runs: "
                f"{type(e).__name__}: {first}"
            ) from e
        atol, rtol = self._tol
        for name, r in ref.items():
            g = got[name]
            if g.shape != r.shape:
                raise RuntimeError(
                    f"cross-check: output {name} has shape {g.shape} on onnxruntime and {r.shape} on onnx.reference"
                )
            diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
            self.cross_checked[name] = float(diff.max()) if diff.size else 0.0
            if not np.all(diff <= atol + rtol * np.abs(r)):
                raise RuntimeError(
                    f"cross-check: output {name} differs by {self.cross_checked[name]:.2e} between onnxruntime with "
                    "the numpy plugin ops and onnx.reference on the first item of the batch"
                )

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feeds(feeds)
        if self._pending_check:
            self._cross_check(feeds)
            self._pending_check = False
        return self._run(feeds)


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes captured as CUDA graphs for a batcher of ``max_batch``: the powers of two below it,
    and itself (``16 -> (1, 2, 4, 8, 16)``, ``12 -> (1, 2, 4, 8, 12)``). A batch of ``n`` runs in the
    smallest of them that holds it, so padding at most doubles the work of the smallest batches."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch}
    return tuple(sorted(sizes | {max_batch}))


def batch_chunks(n: int, sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(start, stop, captured size)`` covering a batch of ``n``: chunks of the largest size, then the rest
    padded up to the smallest size that holds it."""
    if n < 1:
        raise ValueError(f"a batch needs at least one image, got {n}")
    sizes = sorted(sizes)
    chunks, start = [], 0
    while n - start > sizes[-1]:
        chunks.append((start, start + sizes[-1], sizes[-1]))
        start += sizes[-1]
    rest = n - start
    chunks.append((start, n, next(s for s in sizes if s >= rest)))
    return chunks


class StaticBatches:
    """One captured computation per batch size with static input and output buffers: copy a chunk into
    the input buffer (the padding rows zeroed), replay, read the output rows that hold real images.

    ``capture(static_input) -> (replay, static_outputs)`` does the capturing: a CUDA graph on a GPU
    (:func:`cuda_graph_capture`); tests pass a plain function. The model must treat the images of a batch
    independently (eval mode), so the padding rows do not change the real ones.
    """

    def __init__(self, capture, sizes: Sequence[int], example) -> None:
        import torch

        self.sizes = tuple(sorted(sizes))
        self.item_shape = tuple(example.shape[1:])  # the shape of one input the graphs hold
        self._torch = torch
        self._entries = {}
        for size in sorted(self.sizes, reverse=True):  # largest first: the smaller ones reuse its memory
            static_in = example.new_zeros((size, *example.shape[1:]))
            replay, static_out = capture(static_in)
            self._entries[size] = (replay, static_in, static_out)

    def __call__(self, x):
        torch = self._torch
        outs = []
        for start, stop, size in batch_chunks(x.shape[0], self.sizes):
            replay, static_in, static_out = self._entries[size]
            n = stop - start
            static_in[:n].copy_(x[start:stop])
            if n < size:
                static_in[n:].zero_()
            replay()
            outs.append([t[:n].clone() for t in torch.utils._pytree.tree_leaves(static_out)])
        return [torch.cat(parts) for parts in zip(*outs, strict=True)]


def cuda_graph_capture(model, warmup_runs: int = 3):
    """``capture`` for :class:`StaticBatches` on CUDA: warm up on a side stream (cuDNN and Triton pick
    and compile their kernels), then record one CUDA graph; graphs share one memory pool."""
    import torch

    pool = torch.cuda.graph_pool_handle()

    def capture(static_in):
        stream = torch.cuda.Stream(static_in.device)
        stream.wait_stream(torch.cuda.current_stream(static_in.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup_runs):
                model(static_in)
        torch.cuda.current_stream(static_in.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            static_out = model(static_in)
        return graph.replay, static_out

    return capture


class TorchRunner(Runner):
    """A torch ``nn.Module`` in eval mode; outputs flattened in order and named like the ONNX graph.

    ``prepare=True`` (or a ``dtype``) runs a copy made by
    :func:`attn_export.runtime.precision.prepare_for_inference` (BatchNorm folded, cast to ``dtype``
    with the values that cannot live in half precision kept out of it); the caller's model is then
    left as it was. Inputs are cast to the model's dtype; outputs come back as float32.

    ``cuda_graphs=True`` on a CUDA device captures one CUDA graph per size of
    :func:`graph_batch_sizes` (``max_batch``) when the runner is built, and runs each batch as a replay
    of the smallest graph that holds it (padded with zeros; larger batches in chunks): no Python or
    kernel-launch overhead per layer. If capturing fails the runner says why in ``notes`` and runs eagerly.
    """

    name = "torch"

    def __init__(
        self,
        model,
        input_names: Sequence[str] = ("images",),
        output_names: Sequence[str] | None = None,
        device: str = "cpu",
        dtype=None,
        prepare: bool = False,
        cuda_graphs: bool = False,
        max_batch: int = 16,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        import threading

        import torch

        self._torch = torch
        self.notes: list[str] = []
        if prepare or dtype is not None:
            from attn_export.runtime.precision import prepare_for_inference

            model = prepare_for_inference(model, dtype)
        model.eval()  # never chain on eval(): mmcv-style backbones override train() without returning self
        self.model = model.to(device)
        self.dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        self.device = device
        self.input_names = list(input_names)
        self.output_names = list(output_names) if output_names else []
        self._lock = threading.Lock()  # one set of static buffers: one batch at a time
        self.graphs: StaticBatches | None = None
        mode = ""
        if cuda_graphs and torch.device(device).type == "cuda":
            if not input_shape:
                self.notes.append("CUDA graphs off: the model's input shape is unknown")
            else:
                example = torch.zeros((1, *input_shape), device=device, dtype=self.dtype)
                try:
                    self.graphs = StaticBatches(cuda_graph_capture(self.model), graph_batch_sizes(max_batch), example)
                    mode = f", CUDA graphs for batches {list(self.graphs.sizes)}"
                except Exception as e:  # a model that cannot be captured still serves, eagerly
                    self.notes.append(f"CUDA graphs off: capturing failed ({type(e).__name__}: {e})")
        dtype_name = str(self.dtype).removeprefix("torch.")
        self.provider = f"torch {torch.__version__} {device} {dtype_name}{mode}"

    @property
    def max_batch(self) -> int | None:
        """The largest captured batch (a batch above it runs in chunks), or None without graphs."""
        return self.graphs.sizes[-1] if self.graphs is not None else None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        self._check_feeds(feeds)
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        args = [a.to(self.dtype) if a.is_floating_point() else a for a in args]
        with self._lock, torch.inference_mode():
            captured = self.graphs is not None and len(args) == 1 and tuple(args[0].shape[1:]) == self.graphs.item_shape
            outs = self.graphs(args[0]) if captured else self.model(*args)  # another shape runs eagerly
            flat = [t.detach().float().cpu().numpy() for t in torch.utils._pytree.tree_leaves(outs)]
        if not self.output_names:
            self.output_names = [f"output{i}" for i in range(len(flat))]
        if len(flat) != len(self.output_names):
            raise RuntimeError(f"torch model returned {len(flat)} outputs, expected {len(self.output_names)}")
        return dict(zip(self.output_names, flat, strict=True))
