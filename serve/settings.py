"""Service settings: pydantic-settings, read from ``ATTN_EXPORT_*`` environment variables.

Every field can be set as ``ATTN_EXPORT_<NAME>`` (e.g. ``ATTN_EXPORT_MAX_BATCH=16``,
``ATTN_EXPORT_API_KEY=...``, ``ATTN_EXPORT_CLASS_NAMES='["a","b"]'``); ``attn-export serve``'s
options override them. :func:`attn_export.serve.app.create_app` takes a :class:`Settings`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from attn_export.detection.loader import default_model

ENV_PREFIX = "ATTN_EXPORT_"
BACKENDS = ("onnxruntime", "torch", "tensorrt")


class Settings(BaseSettings):
    """What the service runs and how (see docs/serving.md for each knob)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", protected_namespaces=())

    # what to serve
    model: Path | None = Field(None, description="a .onnx graph, a TensorRT engine or an attn-export checkpoint")
    backend: Literal["onnxruntime", "torch", "tensorrt"] = "onnxruntime"
    device: str = Field("auto", description="torch backend: cpu, cuda, cuda:N or auto")
    cuda_graphs: bool = Field(
        True, description="torch backend on CUDA: capture CUDA graphs at start-up for the batch sizes the batcher uses"
    )
    threads: int | None = Field(
        None, ge=1, le=256, description="onnxruntime intra-op threads (default: the CPUs less one, at least 1)"
    )
    ort_spinning: bool = Field(
        False, description="let onnxruntime's idle threads spin (faster on a dedicated CPU, slower on a shared one)"
    )
    cache_dir: Path | None = Field(
        None, description="where a checkpoint served on onnxruntime is exported (default: next to it, else a temp dir)"
    )
    input_size: int | None = Field(None, ge=32, le=4096, description="letterbox size (default: from the model)")
    class_names: Annotated[list[str] | None, NoDecode] = Field(
        None, description="class names, a JSON list or comma-separated (default: from the model's metadata)"
    )
    head: Literal["contract", "yolov5", "yolov8"] | None = Field(
        None, description="how the output reads: contract (x1 y1 x2 y2 + scores), yolov5, yolov8 (default: detected)"
    )
    rect: bool | None = Field(
        None, description="letterbox to a rectangle of whole strides (default: when the graph has free height/width)"
    )

    # network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own model")
    root_path: str = ""
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="also speak the Open Inference Protocol over gRPC on this port, on the same host (0: any free "
        "port; default: off)",
    )

    # batching
    max_batch: int | None = Field(
        None, ge=1, le=256, description="most images in one inference call (default: 4 on a CPU, 16 on a GPU)"
    )
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long the first image waits for company")
    queue_size: int = Field(128, ge=1, le=100_000, description="images waiting at most; more get 503")
    batch_shapes: Literal["group", "pad"] = Field(
        "group", description="rect letterboxes of several shapes: batch one shape at a time, or pad to the largest"
    )
    warmup: bool = True
    cpu_threads: int | None = Field(
        None, ge=1, le=64, description="threads decoding and post-processing (default: the CPU count, 2 to 4)"
    )
    cpu_nice: int = Field(
        5, ge=0, le=19, description="those threads' niceness: inference runs first when CPUs are short (Linux)"
    )

    # detection defaults (each request may override them)
    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.45, ge=0, le=1)
    max_det: int = Field(100, ge=1, le=1000)

    # limits and access
    api_key: SecretStr | None = Field(None, description="when set, POST /detect needs the header X-API-Key")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest request body")
    max_pixels: int = Field(40_000_000, ge=1, description="largest image (width x height) to decode")
    max_side: int = Field(20_000, ge=1, description="longest image side to decode")
    max_images: int = Field(16, ge=1, le=1024, description="most images in one request")
    request_timeout_s: float = Field(60.0, gt=0, description="a request waiting longer for its results gets 504")

    # admission control and timeouts (the door: past a bound, 503 with Retry-After at once)
    max_in_flight: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="requests with a body (POST) admitted and not yet answered, at most (default: 4 x max batch)",
    )
    max_bytes_in_flight: int = Field(
        160 * 1024 * 1024, ge=1024, description="body bytes of the admitted requests, at most (from Content-Length)"
    )
    max_pixels_in_flight: int = Field(
        512_000_000, ge=1, description="image pixels (from their headers) admitted for decoding at once, at most"
    )
    max_retry_after_s: int = Field(60, ge=1, le=3600, description="the longest Retry-After the server suggests")
    header_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a connection whose request headers take longer is closed (408)"
    )
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request body taking longer to arrive gets 408")
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=3600, description="an idle kept-alive connection is closed")
    max_connections: int = Field(
        1024, ge=1, description="open connections at most (uvicorn's limit_concurrency: beyond, 503 to everything)"
    )
    release_memory: bool = Field(True, description="hand freed heap memory back to the system when idle (glibc)")
    graceful_timeout_s: float = Field(30.0, ge=0, description="shutdown: how long requests in flight may finish")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = True

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v):
        return None if v in ("", None) else v

    @field_validator("class_names", mode="before")
    @classmethod
    def _names_from_csv(cls, v):
        if isinstance(v, str):
            if v.lstrip().startswith("["):
                return json.loads(v)
            return [t.strip() for t in v.split(",") if t.strip()] or None
        return v

    @model_validator(mode="after")
    def _fill_model(self) -> Settings:
        if self.model is None:
            self.model = default_model()
        return self
