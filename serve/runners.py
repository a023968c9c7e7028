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


class TorchRunner(Runner):
    """A torch ``nn.Module`` in eval mode; outputs flattened in order and named like the ONNX graph."""

    name = "torch"

    def __init__(
        self,
        model,
        input_names: Sequence[str] = ("images",),
        output_names: Sequence[str] | None = None,
        device: str = "cpu",
    ) -> None:
        import torch

        self._torch = torch
        self.model = model.eval().to(device)
        self.device = device
        self.provider = f"torch {torch.__version__} {device}"
        self.input_names = list(input_names)
        self.output_names = list(output_names) if output_names else []

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        self._check_feeds(feeds)
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.inference_mode():
            outs = self.model(*args)
        flat = [t.detach().float().cpu().numpy() for t in torch.utils._pytree.tree_leaves(outs)]
        if not self.output_names:
            self.output_names = [f"output{i}" for i in range(len(flat))]
        if len(flat) != len(self.output_names):
            raise RuntimeError(f"torch model returned {len(flat)} outputs, expected {len(self.output_names)}")
        return dict(zip(self.output_names, flat, strict=True))
