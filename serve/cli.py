"""``attn-export serve``: run the detection service (uvicorn).

``main(argv) -> int`` is the entry point (``attn-export serve ...``, or ``python -m attn_export.serve.cli``).
Options override the ``ATTN_EXPORT_*`` environment variables (:class:`~attn_export.serve.settings.Settings`).
With one worker the model loads before the port opens, so a bad model exits at once with status 2 and
a message; with ``--workers N`` a checkpoint is exported once here, then each worker process loads the
model itself (settings travel to them as environment variables).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import logging.config
import os
import sys
from pathlib import Path

from attn_export.serve.settings import BACKENDS, ENV_PREFIX, Settings

log = logging.getLogger("attn_export.serve")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attn-export serve",
        description="Serve a detection model over HTTP: POST /detect, GET /healthz, /readyz, /metrics, /docs, and a "
        "demo page at /. Every option can also be set as an environment variable ATTN_EXPORT_<OPTION> "
        "(e.g. ATTN_EXPORT_API_KEY, ATTN_EXPORT_MAX_BODY_BYTES); see docs/serving.md.",
    )
    p.add_argument(
        "model",
        nargs="?",
        type=Path,
        help="a .onnx graph, a TensorRT engine (.engine) or an attn-export checkpoint (.pt; on onnxruntime it is "
        "exported once to a cached .onnx next to it). Default: ATTN_EXPORT_MODEL, else models/shapes_detector.onnx",
    )
    p.add_argument("--backend", choices=BACKENDS, help="default onnxruntime (its CUDA provider when present)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument(
        "--grpc-port",
        type=int,
        help="also serve the Open Inference Protocol over gRPC (tritonclient.grpc) on this port of --host (off)",
    )
    p.add_argument("--workers", type=int, help="server processes, each with its own model (default 1)")
    p.add_argument("--max-batch", type=int, help="most images per inference call (default 8)")
    p.add_argument("--max-wait-ms", type=float, help="how long a lone image waits for others to batch with (default 5)")
    p.add_argument("--queue-size", type=int, help="images queued at most; beyond, requests get 503 (default 128)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    p.add_argument("--device", help="torch backend: cpu, cuda, cuda:N (default auto)")
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        default=None,
        help="torch backend on CUDA: run eagerly instead of replaying CUDA graphs captured at start-up",
    )
    p.add_argument("--input-size", type=int, help="letterbox size (default: from the model)")
    p.add_argument(
        "--head",
        choices=("contract", "yolov5", "yolov8"),
        help="how the model's output reads: contract (batch, N, 4 + classes) xyxy + scores; yolov5 (batch, N, 5 + "
        "classes) xywh + objectness + scores; yolov8 (batch, 4 + classes, N) xywh + scores (default: from the graph)",
    )
    p.add_argument(
        "--rect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="letterbox each image to the smallest rectangle of whole strides (default: when the graph has free "
        "height and width; --no-rect: always the square)",
    )
    p.add_argument("--batch-shapes", choices=("group", "pad"), help="rect batches: one shape each (group, default) "
                   "or padded to the largest")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, help="where a checkpoint's ONNX export is cached")
    p.add_argument(
        "--max-in-flight", type=int, help="requests admitted at once; beyond, 503 + Retry-After (4 x max batch)"
    )
    p.add_argument("--max-bytes-in-flight", type=int, help="body bytes of the admitted requests (160 MiB)")
    p.add_argument("--max-pixels-in-flight", type=int, help="image pixels admitted for decoding (512 M)")
    p.add_argument("--header-timeout-s", type=float, help="request headers must arrive within this (30 s)")
    p.add_argument("--body-timeout-s", type=float, help="a request body must arrive within this (30 s)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None, help="skip the warm-up")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", default=None, help="no access log")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment settings, overridden by the options given."""
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def settings_to_env(settings: Settings) -> dict[str, str]:
    """``ATTN_EXPORT_*`` variables that rebuild ``settings`` in another process."""
    env = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env


def log_config(level: str) -> dict:
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["attn_export"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except Exception as e:  # pydantic's ValidationError: an option or variable out of range
        print(f"attn-export serve: error: {e}", file=sys.stderr)
        return 2
    if settings.grpc_port is not None:
        from attn_export.serve.v2_grpc import missing_dependency

        why = missing_dependency()
        if why is not None:
            print(f"attn-export serve: error: {why}", file=sys.stderr)
            return 2
    from attn_export.detection.loader import ModelError

    logging.config.dictConfig(log_config(settings.log_level))
    run_options = {
        "host": settings.host,
        "port": settings.port,
        "log_config": log_config(settings.log_level),
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": int(settings.graceful_timeout_s),
        "server_header": False,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections,
    }
    try:
        return _run(settings, run_options)
    except ModelError as e:
        print(f"attn-export serve: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # uvicorn exits on a failed start (e.g. the port is taken)
        return e.code if isinstance(e.code, int) else 1


def _run(settings: Settings, run_options: dict) -> int:
    import uvicorn

    from attn_export.detection.loader import export_cached, load, model_kind
    from attn_export.serve.app import create_app
    from attn_export.serve.door import protocol_with_header_timeout

    if settings.workers == 1:
        model = load(settings)
        app = create_app(settings, loader=lambda _settings: model)
        closed = app.state.service.metrics.connections_closed
        http = protocol_with_header_timeout(settings.header_timeout_s, lambda reason: closed.labels(reason).inc())
        uvicorn.run(app, http=http, **run_options)
        return 0
    model = settings.model
    on_ort = settings.backend == "onnxruntime"
    if on_ort and model is not None and model.is_file() and model_kind(model) == "checkpoint":
        export_cached(model, settings.cache_dir, settings.max_batch or 8)  # once, before the workers start
    os.environ.update(settings_to_env(settings))
    http = "attn_export.serve.door:HeaderTimeoutProtocol"  # reads ATTN_EXPORT_HEADER_TIMEOUT_S
    uvicorn.run("attn_export.serve.app:app_from_env", factory=True, workers=settings.workers, http=http, **run_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
