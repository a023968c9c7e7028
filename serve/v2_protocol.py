"""The Open Inference Protocol (KServe v2) apart from its transport: what the HTTP routes of
:mod:`attn_export.serve.v2_http` and the gRPC service of :mod:`attn_export.serve.v2_grpc` both answer,
from a :class:`~attn_export.serve.service.Service` (read at request time: the model loads after the
routes exist), and the one mapping of the service's refusals to the protocol's errors."""

from __future__ import annotations

from typing import Any

import numpy as np

from attn_export.detection.contract import (
    INPUT,
    MODEL_VERSION,
    OUTPUT_TYPES,
    OUTPUTS,
    Params,
    json_config,
    model_config,
    output_dims,
    pack,
    shown,
)
from attn_export.detection.imaging import InputError
from attn_export.detection.pipeline import Detected
from attn_export.serve.batching import BatcherClosed
from attn_export.serve.door import Busy, shed
from attn_export.serve.service import NoResult, Service

SERVER_NAME = "attn-export"
EXTENSIONS = ["binary_tensor_data", "parameters", "model_configuration", "model_repository"]


class ProtocolError(Exception):
    """An answer in the protocol's error form: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def protocol_error(e: Exception, metrics=None) -> ProtocolError | None:
    """The protocol's error for what the pipeline raised (counting a shed request), or None for a bug."""
    if isinstance(e, ProtocolError):
        return e
    if isinstance(e, Busy):
        return ProtocolError(503, e.message, shed(e, metrics))
    if isinstance(e, InputError):
        return ProtocolError(e.status, e.message)
    if isinstance(e, BatcherClosed):
        return ProtocolError(503, str(e), {"Retry-After": "5"})
    if isinstance(e, NoResult):
        return ProtocolError(504, str(e))
    return None


def check_input(name: Any, datatype: Any, shape: Any, max_images: int, given_twice: bool = False) -> None:
    """An input tensor's name, datatype and shape against the contract (HTTP and gRPC alike)."""
    if name != INPUT:
        raise ProtocolError(400, f"unexpected inference input {shown(name)}: the model takes one input, {INPUT!r}")
    if given_twice:
        raise ProtocolError(400, f"input {INPUT!r} is given twice")
    if datatype != "BYTES":
        raise ProtocolError(400, f"input {INPUT!r}: datatype must be BYTES, got {shown(datatype)}")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1] != 1
        or shape[0] < 1
    ):
        raise ProtocolError(400, f"input {INPUT!r}: shape must be [batch, 1] with batch >= 1, got {shown(shape)}")
    if shape[0] > max_images:
        raise ProtocolError(
            400, f"input {INPUT!r}: batch {shape[0]} is above this model's max_batch_size of {max_images}"
        )


def defaults_of(settings) -> Params:
    return Params(settings.conf, settings.iou, settings.max_det)


def model_or_error(svc, name: str, version: str = "") -> Any:
    """The served model when ``name`` (and ``version``, when given) name it; else 404, or 503 while loading."""
    m = svc.model
    if m is None or svc.batcher is None:
        raise ProtocolError(503, "the model is loading", {"Retry-After": "5"})
    if name != m.name:
        raise ProtocolError(404, f"unknown model: {shown(name)}; this server serves {m.name!r}")
    if version not in ("", MODEL_VERSION):
        raise ProtocolError(
            404, f"unknown version {shown(version)} of model {shown(name)}; it has version {MODEL_VERSION}"
        )
    return m


def model_metadata(svc, m) -> dict:
    """The model metadata (``GET /v2/models/NAME``; gRPC ``ModelMetadata``)."""
    dims = output_dims(svc.settings.max_det)
    return {
        "name": m.name,
        "versions": [MODEL_VERSION],
        "platform": f"attn-export_{m.backend}",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": n, "datatype": OUTPUT_TYPES[n][0], "shape": [-1, *dims[n]]} for n in OUTPUTS],
    }


def model_config_of(svc, m) -> dict:
    """The model config in Triton's JSON shape (``GET .../config``; gRPC ``ModelConfig``)."""
    settings = svc.settings
    kind = "KIND_CPU" if m.runner.device == "cpu" else "KIND_GPU"
    config = model_config(
        m.name,
        max_batch=settings.max_images,
        class_names=m.class_names,
        input_size=m.input_size,
        defaults=defaults_of(settings),
        backend="attn-export",
        instance_kind=kind,
        max_queue_delay_us=int(settings.max_wait_ms * 1000),
        parameters={
            "runtime": m.backend,
            "provider": m.provider,
            "max_pixels": settings.max_pixels,
            "max_side": settings.max_side,
        },
    )
    config["dynamic_batching"]["preferred_batch_size"] = [svc.batcher.max_batch]
    config["platform"] = f"attn-export_{m.backend}"
    config["version_policy"] = {"latest": {"num_versions": 1}}
    return json_config(config)


async def infer_tensors(svc: Service, images: list[bytes], params: Params, ticket=None) -> dict[str, np.ndarray]:
    """The contract's four output tensors for ``images``, through the service's detection pipeline (the
    pixels reserved on the door's ``ticket``)."""
    max_det = svc.settings.max_det

    def reply(detected: Detected) -> dict[str, np.ndarray]:
        return pack(detected.dets, max_det)

    tensors, _ = await svc.detect(lambda: (images, None), params, reply, budget=ticket)
    return tensors
