"""The Python-backend models of a Triton repository written by ``attn-export triton``.

Each class here is a Triton Python-backend model (``initialize(args)`` / ``execute(requests)`` /
``finalize()``); the repository's ``model.py`` imports one of them under the name Triton looks for,
``TritonPythonModel``. They run in tritonserver's Python stub process, so ``attn_export`` (with numpy,
Pillow and onnxruntime) must be importable there: ``attn-export triton serve`` passes its own
interpreter's site-packages (``PYTHONPATH`` and ``ATTN_EXPORT_SITE_DIRS``); see docs/triton.md.

- :class:`Detector` (``--backend python``): the whole contract in one model. ``execute`` gets the
  dynamic batcher's requests and runs them through the detection pipeline of ``attn-export serve``
  (:mod:`attn_export.detection.pipeline`): every image decoded and letterboxed, all of them through the
  network in one call (onnxruntime, or a TensorRT engine; a graph with free height and width gets each
  image's rect letterbox, one call per shape), the output read by its head (the contract, YOLOv5, YOLOv8),
  then NMS and the boxes mapped back to each image's pixels. A request whose image is bad gets its own error; the
  others in the batch are answered.
- :class:`Preprocess` and :class:`Postprocess`: the two Python steps of the ensemble around a network
  that runs in Triton's native onnxruntime or TensorRT backend (``--backend onnxruntime|tensorrt``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from attn_export.detection.contract import INPUT, ContractError, Params, image_bytes, request_params
from attn_export.detection.postprocess import to_input

log = logging.getLogger("attn_export.serve")

#: the ensemble's tensor between pre- and post-processing: scale, pad x, pad y, decoded h, decoded w,
#: original width, original height
LETTERBOX = "letterbox"
LETTERBOX_DIMS = [7]


def config_parameters(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def defaults_from(params: dict[str, str]) -> Params:
    return Params(float(params["conf"]), float(params["iou"]), int(params["max_det"]))


def make_runner(path: Path, *, threads: int | None = None, gpu: bool = False, device_id: int = 0):
    """onnxruntime for ``.onnx`` (its CUDA provider on a GPU instance when installed), TensorRT for an engine."""
    from attn_export.runtime.runners import OnnxRuntimeRunner

    if path.suffix in (".plan", ".engine"):
        from attn_export.runtime.trt_runner import TensorRTRunner

        return TensorRTRunner(path, device=device_id)
    providers = None
    if gpu:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    spin = {"session.intra_op.allow_spinning": "0"}
    return OnnxRuntimeRunner(path, providers=providers, threads=threads, session_config=spin)


def _request_parameters(request) -> dict[str, Any]:
    try:
        text = request.parameters()
    except AttributeError:  # older Python backends have no request parameters
        return {}
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _error(pb, message: str):
    code = getattr(getattr(pb, "TritonError", None), "INVALID_ARG", None)
    err = pb.TritonError(message, code) if code is not None else pb.TritonError(message)
    return pb.InferenceResponse(output_tensors=[], error=err)


class _Base:
    def _setup(self, args: dict) -> dict[str, str]:
        import triton_python_backend_utils as pb

        self.pb = pb
        self.config = json.loads(args["model_config"])
        self.folder = Path(args["model_repository"]) / str(args["model_version"])
        self.gpu = args.get("model_instance_kind") == "GPU"
        self.device_id = int(args.get("model_instance_device_id") or 0)
        return config_parameters(self.config)

    def finalize(self) -> None:
        self.runner = None


class _Decoding(_Base):
    def _decode_setup(self, params: dict[str, str]) -> None:
        from attn_export.detection.pipeline import Limits  # Pillow, numpy: only where the model runs

        stride = int(params["stride"]) if params.get("stride") else None  # set: free H and W, rect letterbox
        self.limits = Limits(
            int(params["input_size"]),
            int(params.get("max_pixels", 40_000_000)),
            int(params.get("max_side", 20_000)),
            stride,
            int(params.get("min_side") or 0),
        )

    def _decode(self, request) -> list:
        from attn_export.detection.imaging import InputError
        from attn_export.detection.pipeline import decode_all

        tensor = self.pb.get_input_tensor_by_name(request, INPUT)
        if tensor is None:
            raise ContractError(f"the request has no input {INPUT!r}")
        rows = tensor.as_numpy().reshape(-1)
        images = []
        for j, row in enumerate(rows):
            try:
                images.append(image_bytes(row))
            except ContractError as e:
                raise ContractError(f"image {j}: {e}" if len(rows) > 1 else str(e)) from e
        try:
            return decode_all(images, self.limits).decoded
        except InputError as e:
            raise ContractError(e.message) from e


class Detector(_Decoding):
    """The contract in one Python-backend model: decode, network, NMS (see the module docstring)."""

    def initialize(self, args: dict) -> None:
        params = self._setup(args)
        self._decode_setup(params)
        self.defaults = defaults_from(params)
        threads = int(params["threads"]) if params.get("threads") else None
        self.runner = make_runner(
            self.folder / params.get("model_file", "model.onnx"),
            threads=threads,
            gpu=self.gpu,
            device_id=self.device_id,
        )
        self.input_name = self.runner.input_names[0]
        self.output_name = self.runner.output_names[0]  # a YOLO export's first output: the decoded one
        self.head = params.get("head") or "contract"
        self.chunk = int(params.get("network_max_batch") or self.config.get("max_batch_size") or 1) or 1

    def _infer(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """Images (3, h, w) uint8 -> their rows (N, 4 + C); images of one shape run together (rect
        letterboxes of several shapes: one call per shape, in chunks of the network's max batch)."""
        from attn_export.detection.heads import decode

        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            by_shape.setdefault(p.shape, []).append(i)
        rows: list = [None] * len(pixels)
        for idx in by_shape.values():
            for j in range(0, len(idx), self.chunk):
                part = idx[j : j + self.chunk]
                batch = to_input(np.stack([pixels[i] for i in part]))
                out = decode(self.runner.infer({self.input_name: batch})[self.output_name], self.head)
                for i, row in zip(part, out, strict=True):
                    rows[i] = row
        return rows

    def execute(self, requests: list) -> list:
        from attn_export.detection.pipeline import answer, take_pixels

        pb = self.pb
        responses: list = [None] * len(requests)
        jobs = []
        for i, request in enumerate(requests):
            try:
                params = request_params(_request_parameters(request), self.defaults)
                jobs.append((i, params, self._decode(request)))
            except ContractError as e:
                responses[i] = _error(pb, str(e))
        if jobs:
            try:
                preds = self._infer([p for _, _, decoded in jobs for p in take_pixels(decoded)])
            except Exception as e:  # every request of the batch gets the error; the model stays up
                log.exception("inference failed")
                for i, _, _ in jobs:
                    responses[i] = pb.InferenceResponse(
                        output_tensors=[], error=pb.TritonError(f"inference failed: {e}")
                    )
                return responses
            offset = 0
            for i, params, decoded in jobs:
                rows = preds[offset : offset + len(decoded)]
                offset += len(decoded)
                tensors = answer(rows, decoded, params, self.defaults.max_det)
                responses[i] = pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in tensors.items()])
        return responses


class Preprocess(_Decoding):
    """Ensemble step 1: ``image`` bytes -> the network input and the letterbox geometry."""

    def initialize(self, args: dict) -> None:
        params = self._setup(args)
        self._decode_setup(params)
        self.network_input = params["network_input"]

    def execute(self, requests: list) -> list:
        from attn_export.detection.pipeline import stack

        pb = self.pb
        responses = []
        for request in requests:
            try:
                decoded = self._decode(request)
            except ContractError as e:
                responses.append(_error(pb, str(e)))
                continue
            pixels = to_input(stack(decoded))
            geometry = np.array(
                [[d.scale, *d.pad, *d.decoded_hw, d.width, d.height] for d in decoded], dtype=np.float32
            )
            responses.append(
                pb.InferenceResponse(
                    output_tensors=[pb.Tensor(self.network_input, pixels), pb.Tensor(LETTERBOX, geometry)]
                )
            )
        return responses


class Postprocess(_Base):
    """Ensemble step 3: the network output and the letterbox geometry -> the contract's outputs."""

    def initialize(self, args: dict) -> None:
        params = self._setup(args)
        self.defaults = defaults_from(params)
        self.network_output = params["network_output"]
        self.head = params.get("head") or "contract"

    def execute(self, requests: list) -> list:
        from attn_export.detection.heads import decode
        from attn_export.detection.imaging import Decoded
        from attn_export.detection.pipeline import answer

        pb = self.pb
        responses = []
        for request in requests:
            try:
                params = request_params(_request_parameters(request), self.defaults)
            except ContractError as e:
                responses.append(_error(pb, str(e)))
                continue
            preds = decode(pb.get_input_tensor_by_name(request, self.network_output).as_numpy(), self.head)
            geometry = pb.get_input_tensor_by_name(request, LETTERBOX).as_numpy()
            decoded = [
                Decoded(None, int(g[5]), int(g[6]), "", float(g[0]), (int(g[1]), int(g[2])), (int(g[3]), int(g[4])))
                for g in geometry
            ]
            tensors = answer(preds, decoded, params, self.defaults.max_det)
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(k, v) for k, v in tensors.items()]))
        return responses
