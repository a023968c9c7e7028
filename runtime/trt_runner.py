"""TensorRT runner: a built engine behind the common :class:`~attn_export.runtime.runners.Runner` interface.

TensorRT 10+ name-based I/O: the engine is deserialized with ``IRuntime``; each :meth:`infer` sets the
input shapes of the dynamic batch (``set_input_shape``), allocates the outputs with torch on the GPU
at the shapes TensorRT then reports (``get_tensor_shape``), binds every I/O tensor by name
(``set_tensor_address``), enqueues with ``execute_async_v3`` on a torch CUDA stream and synchronizes.

The attn-export plugins are registered first: an engine built with JIT plugins calls back into their
Python definitions (an AOT engine does not need them, and registering is harmless). TensorRT and torch
are imported when a runner is built, never at import of this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from attn_export.runtime.engine import read_engine_metadata
from attn_export.runtime.runners import Runner


def _torch_dtype(trt, torch, dtype):
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    for name, value in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = value
    if dtype not in table:
        raise TypeError(f"TensorRTRunner: unsupported engine tensor type {dtype}")
    return table[dtype]


class TensorRTRunner(Runner):
    """A serialized TensorRT engine (``.engine``) on one GPU; ``infer`` takes and returns numpy arrays."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, device: int = 0) -> None:
        import tensorrt as trt
        import torch

        from attn_export.plugins import trt as trt_plugins

        if not torch.cuda.is_available():
            raise RuntimeError("TensorRTRunner needs a CUDA GPU, and torch sees none (torch.cuda.is_available())")
        self._trt, self._torch = trt, torch
        self.engine_path = Path(engine_path)
        self._device = torch.device("cuda", int(device))
        self.device = str(self._device)
        self.metadata = read_engine_metadata(self.engine_path)
        plugin_note = ""
        try:
            trt_plugins.register_trt_plugins()
        except trt_plugins.TensorRTError as e:  # an engine without attn-export plugins does not need them
            plugin_note = f" (the attn-export plugins could not be registered: {e})"

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self._device):
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise RuntimeError(
                    f"TensorRT {trt.__version__} cannot deserialize {self.engine_path}: engines only load with the "
                    f"TensorRT version and GPU kind they were built with{plugin_note}"
                )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise RuntimeError(f"TensorRT could not create an execution context for {self.engine_path}")
            self._stream = torch.cuda.Stream(device=self._device)

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        meta = self.metadata or {}
        mode = meta.get("plugins", {}).get("mode")
        precision = meta.get("precision")
        notes = [precision] if precision else []
        notes += [f"{mode} plugins"] if mode else []
        self.provider = ", ".join([f"TensorRT {trt.__version__}", *notes])

    def profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of input ``name`` in the engine's first optimisation profile."""
        shapes = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(tuple(int(d) for d in s) for s in shapes)  # type: ignore[return-value]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        self._check_feeds(feeds)
        with torch.cuda.device(self._device):
            current = torch.cuda.current_stream(self._device)
            keep = []  # the tensors TensorRT reads and writes, alive until the stream is synchronized
            for name in self.input_names:
                array = np.ascontiguousarray(feeds[name])
                tensor = torch.from_numpy(array).to(self._device, dtype=self._dtypes[name]).contiguous()
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    lo, _, hi = self.profile(name)
                    raise ValueError(
                        f"{self.name}: input {name!r} of shape {tuple(tensor.shape)} is outside the engine's profile "
                        f"(min {lo}, max {hi}); rebuild with a wider --batch (or --dynamic-hw for the height and width)"
                    )
                self.context.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            outputs = {}
            for name in self.output_names:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.name}: TensorRT could not resolve the shape of output {name!r}: {shape}")
                out = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
                self.context.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            self._stream.wait_stream(current)  # the inputs were copied on the current stream
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed for {self.engine_path}")
            self._stream.synchronize()
            del keep
            return {name: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for name, t in outputs.items()}
