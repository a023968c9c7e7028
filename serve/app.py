"""The detection service: a FastAPI app made by :func:`create_app` (the model loads in its lifespan).

Endpoints: ``POST /detect`` (images in, boxes out: JSON, or a PNG with the boxes drawn), ``GET /healthz``
(the process answers), ``GET /readyz`` (the model is loaded and warmed up, and the server is not
shutting down), ``GET /metrics`` (Prometheus), ``GET /`` (a page to try it), ``/docs`` and
``/openapi.json``.

A request's path: the limits middleware counts it and checks the API key; the door
(:mod:`attn_export.serve.door`) admits it within the bounds on requests and bytes in flight (else
503 with Retry-After, before the body is read), then reads the body up to ``max_body_bytes`` (413
beyond it, before any parsing) within ``body_timeout_s`` (408 beyond); the form is parsed, the image
headers are read (their pixels count against the pixels in flight) and the images are decoded and
letterboxed on the service's CPU pool (:mod:`attn_export.detection.imaging`); the
:class:`~attn_export.serve.batching.Batcher` runs them with the images of other requests in one
inference call on its own thread; NMS, the mapping back to original pixels and the JSON run on the CPU
pool again. The event loop only moves bytes, so the probes stay fast at any load.

Errors are JSON ``{"error": KIND, "detail": MESSAGE, "status": CODE}``, 4xx for anything a client sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from attn_export import __version__
from attn_export.detection.imaging import (
    ACCEPTED,
    MIME_TYPES,
    Decoded,
    InputError,
    decode_image,
    draw,
    open_image,
    to_input,
)
from attn_export.detection.loader import ModelError, ServedModel, load
from attn_export.serve.batching import Batcher, BatcherClosed, QueueFull
from attn_export.serve.door import (
    SCOPE_DISCONNECTED,
    SCOPE_TICKET,
    AdmissionMiddleware,
    Busy,
    Door,
    Ticket,
    release_memory,
    scope_header,
)
from attn_export.serve.metrics import ServeMetrics
from attn_export.serve.settings import Settings

log = logging.getLogger("attn_export.serve")

API_KEY_HEADER = "X-API-Key"
PROTECTED_PATHS = ("/detect",)
#: The Open Inference Protocol's infer routes (serve/v2_http.py): refused at the door without the key too.
PROTECTED_V2 = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")


# ------------------------------------------------------------------------------------------ schemas
class ErrorBody(BaseModel):
    error: str = Field(description="a short kind, e.g. unsupported_type, too_many_pixels, payload_too_large")
    detail: Any = Field(description="what is wrong, for a person")
    status: int


class Detection(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in original-image pixels", min_length=4, max_length=4)
    score: float
    class_id: int
    class_name: str


class ImageTimings(BaseModel):
    decode_ms: float = Field(description="decode and letterbox")
    queue_ms: float = Field(description="waiting for the batch to start")
    inference_ms: float = Field(description="the batch's inference call")
    postprocess_ms: float = Field(description="NMS and the mapping back to original pixels")


class ImageResult(BaseModel):
    index: int
    filename: str | None
    width: int = Field(description="original width, after the EXIF orientation")
    height: int
    format: str
    batch_size: int = Field(description="images in the inference call this image ran in")
    detections: list[Detection]
    timings: ImageTimings


class Params(BaseModel):
    conf: float
    iou: float
    max_det: int


class Timings(BaseModel):
    decode_ms: float = Field(description="work: parsing the body, decoding and letterboxing the images")
    decode_wait_ms: float = Field(0.0, description="waiting for a thread of the CPU pool before decoding")
    queue_ms: float = Field(description="waiting for the batch to start (the longest of the images)")
    inference_ms: float
    postprocess_wait_ms: float = Field(0.0, description="waiting for a thread of the CPU pool before NMS")
    postprocess_ms: float = Field(description="work: NMS, the mapping back to original pixels, the answer")
    total_ms: float


class DetectResponse(BaseModel):
    model: str
    backend: str
    input_size: int
    params: Params
    images: list[ImageResult]
    timings: Timings


MULTIPART_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": f"one or more images ({ACCEPTED}); any file field is taken, in order",
                    }
                },
                "required": ["images"],
            }
        },
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/webp": {"schema": {"type": "string", "format": "binary"}},
        "image/bmp": {"schema": {"type": "string", "format": "binary"}},
    },
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "bad input: empty body, no image, an image that does not decode, a malformed form",
        401: "missing or wrong X-API-Key (when the server has one)",
        408: "the body did not arrive within body_timeout_s",
        413: "body or image too large (bytes, pixels), or too many images",
        415: "unsupported Content-Type or image type",
        422: "a query parameter out of range",
        503: "not ready, shutting down or too busy (Retry-After)",
        504: "the request waited too long for its results",
    }.items()
}


# ------------------------------------------------------------------------------------------ errors
_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


def error_response(status: int, detail: Any, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": kind or _KINDS.get(status, "error"), "detail": detail, "status": status}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ middleware
class LimitsMiddleware:
    """Pure ASGI, outermost: request metrics and the API key of protected paths (checked before the door).

    A request whose client went away before its answer (the door marks it) is counted as a disconnect,
    not by the status it never received.
    """

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        svc = self.service
        metrics = svc.metrics
        t0 = time.perf_counter()
        status_holder = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            early = self._check(scope)
            if early is not None:
                await early(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or ("other" if status_holder[0] == 404 else scope["path"])
            if label.startswith("/static"):
                label = "/static"
            elif label not in svc.known_paths:
                label = "other"
            if not scope.get(SCOPE_DISCONNECTED):
                metrics.requests.labels(label, scope["method"], str(status_holder[0])).inc()
                metrics.latency.labels(label).observe(time.perf_counter() - t0)

    def _check(self, scope) -> Response | None:
        settings = self.service.settings
        path = scope["path"]
        v2 = PROTECTED_V2.fullmatch(path) is not None
        if settings.api_key is not None and (path in PROTECTED_PATHS or v2):
            given = scope_header(scope, b"x-api-key")
            if given is None or not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
                self.service.metrics.rejected.labels("api_key").inc()
                what = "missing" if given is None else "wrong"
                message = f"{what} API key: send it in the {API_KEY_HEADER} header"
                if v2:  # the protocol's error form
                    return JSONResponse({"error": message}, status_code=401)
                return error_response(401, message)
        return None


def _prefers_png(accept: str | None) -> bool:
    """True when the Accept header ranks image/png above JSON."""
    if not accept:
        return False
    best: dict[str, float] = {}
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media, q = fields[0].lower(), 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                with contextlib.suppress(ValueError):
                    q = float(f[2:])
        best[media] = max(q, best.get(media, 0.0))
    png = best.get("image/png", 0.0)
    return png > 0 and png > best.get("application/json", 0.0)


# ------------------------------------------------------------------------------------------ the service
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
        ).start()
        self.metrics.model_info.labels(model.name, model.backend, model.provider).set(1)
        log.info(
            "serving %s on %s (%s): input %dx%d, classes %s, max batch %d",
            model.path, model.backend, model.provider, model.input_size, model.input_size,
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


def _static_dir():
    return resources.files("attn_export.serve") / "static"


def _params(settings: Settings, conf, iou, max_det) -> Params:
    return Params(
        conf=settings.conf if conf is None else conf,
        iou=settings.iou if iou is None else iou,
        max_det=settings.max_det if max_det is None else max_det,
    )


def _parse_form(
    body: bytes, content_type: str, max_images: int, max_fields: int = 64
) -> list[tuple[str | None, bytes]]:
    """The file parts of a ``multipart/form-data`` body, in order, as ``(filename, bytes)``.

    Parsed from the buffered body with python-multipart's parser (no temporary files, one copy of each
    image); a file part is one with a ``filename`` in its Content-Disposition. More than ``max_images``
    files is a 413 ``too_many_images`` as soon as the next one starts; a malformed body a 400.
    """
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InputError(400, "bad_request", "malformed multipart body: no boundary in the Content-Type header")
    files: list[tuple[str | None, bytes]] = []
    fields: list[str] = []
    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}, "chunks": None, "name": None}

    def on_part_begin():
        state["headers"] = {}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"] = state["value"] = b""

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disp:
            if len(files) >= max_images:
                raise InputError(413, "too_many_images", f"too many images: at most {max_images} per request")
            files.append((disp[b"filename"].decode("utf-8", "replace"), b""))
            state["chunks"] = []
        else:
            if len(fields) >= max_fields:
                raise InputError(400, "bad_request", f"too many form fields: at most {max_fields}")
            fields.append(name)
            state["chunks"] = None

    def on_part_data(data, start, end):
        if state["chunks"] is not None:
            state["chunks"].append(data[start:end])

    def on_part_end():
        if state["chunks"] is not None:
            files[-1] = (files[-1][0], b"".join(state["chunks"]))
            state["chunks"] = None

    def on_end():
        state["ended"] = True

    callbacks = {
        "on_end": on_end,
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise InputError(400, "bad_request", f"malformed multipart body: {e}") from e
    if not state.get("ended"):
        raise InputError(400, "bad_request", "malformed multipart body: it ends before its closing boundary")
    if not files:
        extra = f" (the form has only text fields: {', '.join(fields)})" if fields else ""
        raise InputError(400, "no_image", f"no image in the form{extra}: send files in the field 'images'")
    return files


def _request_images(body: bytes, content_type: str | None, settings: Settings) -> list[tuple[str | None, bytes]]:
    """The request's images as ``(filename, bytes)``: multipart files, or a raw image body."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return _parse_form(body, content_type or "", settings.max_images)
    if not body:
        raise InputError(
            400, "empty_body", f"the request body is empty: send multipart/form-data with image files ({ACCEPTED})"
        )
    if ctype in MIME_TYPES or ctype in ("application/octet-stream", ""):
        return [(None, body)]
    raise InputError(
        415,
        "unsupported_media_type",
        f"unsupported Content-Type {ctype!r}: send multipart/form-data with image files in the field 'images', "
        f"or one raw image body ({', '.join(sorted(MIME_TYPES))})",
    )


def _who(i: int, name: str | None, count: int) -> str | None:
    if count > 1 or name:
        return f"image {i}" + (f" ({name!r})" if name else "")
    return None


def _prepare(
    body: bytes,
    content_type: str | None,
    settings: Settings,
    size: int,
    want_png: bool,
    ticket: Ticket | None,
    stage_metric,
) -> tuple[list[tuple[str | None, bytes]], list[Decoded], list[float]]:
    """On the CPU pool: parse the body, read every image header (their pixels are reserved on the door's
    budget: :class:`Busy` past it), then decode and letterbox the images one after another."""
    t0 = time.perf_counter()
    images = _request_images(body, content_type, settings)
    if want_png and len(images) != 1:
        raise InputError(400, "png_needs_one_image", f"format=png draws one image; this request has {len(images)}")
    opened = []
    for i, (name, data) in enumerate(images):
        try:
            opened.append(open_image(data, settings.max_pixels, settings.max_side))
        except InputError as e:
            who = _who(i, name, len(images))
            raise (InputError(e.status, e.kind, f"{who}: {e.message}") if who else e) from e
    stage_metric.labels("parse").observe(time.perf_counter() - t0)
    if ticket is not None:
        ticket.reserve_pixels(sum(img.size[0] * img.size[1] for img in opened))
    decoded, times = [], []
    try:
        for i, img in enumerate(opened):
            t = time.perf_counter()
            try:
                decoded.append(decode_image(img, size, keep_full=want_png))
            except InputError as e:
                who = _who(i, images[i][0], len(images))
                raise (InputError(e.status, e.kind, f"{who}: {e.message}") if who else e) from e
            opened[i] = None  # its pixels go with it
            times.append(time.perf_counter() - t)
    finally:
        if ticket is not None:
            ticket.release_pixels()
    return [(name, b"") for name, _ in images], decoded, times


def create_app(settings: Settings | None = None, *, loader: Callable[[Settings], ServedModel] | None = None) -> FastAPI:
    """The service app for ``settings`` (default: from the environment). The model loads at startup.

    ``loader`` replaces :func:`attn_export.detection.loader.load` (tests wrap the model, e.g. to slow it).
    """
    settings = settings or Settings()
    svc = Service(settings, loader or load)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        grpc_server = None
        try:
            if settings.grpc_port is not None:  # KServe v2 over gRPC, on this loop, from this service
                from attn_export.serve.v2_grpc import start_grpc

                grpc_server = await start_grpc(svc)
            yield
        finally:
            if grpc_server is not None:
                from attn_export.serve.v2_grpc import stop_grpc

                svc.shutting_down = True  # new RPCs get UNAVAILABLE while those in flight finish
                await stop_grpc(grpc_server, settings.graceful_timeout_s)
            await svc.stop()

    app = FastAPI(
        title="attn-export detection service",
        version=__version__,
        description="Object detection with a model exported by attn-export: upload images, get boxes.",
        lifespan=lifespan,
        root_path=settings.root_path,
    )
    app.state.service = svc
    # the door (innermost of the two: a request without its API key takes no place), then metrics and the key
    app.add_middleware(
        AdmissionMiddleware,
        door=svc.door,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        metrics=svc.metrics,
        on_idle=svc.on_idle,
    )
    app.add_middleware(LimitsMiddleware, service=svc)

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, exc.detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        svc.metrics.rejected.labels("parameter").inc()
        return error_response(422, _describe_validation(list(exc.errors())), "invalid_parameter")

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        svc.metrics.rejected.labels(exc.kind).inc()
        return error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        svc.metrics.queue_full.inc()
        svc.metrics.shed.labels("queue").inc()
        return error_response(503, str(exc), "busy", headers={"Retry-After": str(svc.door.retry_after())})

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        svc.metrics.shed.labels(exc.reason).inc()
        return error_response(503, exc.message, "busy", headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BatcherClosed)
    async def _closed(request: Request, exc: BatcherClosed):
        return error_response(503, str(exc), "shutting_down", headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="needed when configured")

    async def check_api_key(key: str | None = Depends(api_key_scheme)) -> None:
        return None  # checked by LimitsMiddleware before the body is read; declared here for the docs

    # -- routes ------------------------------------------------------------------------------------
    @app.post(
        "/detect",
        response_model=DetectResponse,
        summary="Detect objects in one or more images",
        responses={200: {"content": {"image/png": {}}, "description": "detections (JSON) or the annotated image"}}
        | ERROR_RESPONSES,
        openapi_extra={"requestBody": MULTIPART_BODY},
        dependencies=[Depends(check_api_key)],
    )
    async def detect(
        request: Request,
        conf: float | None = Query(None, ge=0, le=1, description=f"score threshold (default {settings.conf})"),
        iou: float | None = Query(None, ge=0, le=1, description=f"NMS IoU threshold (default {settings.iou})"),
        max_det: int | None = Query(None, ge=1, le=1000, description=f"most boxes per image ({settings.max_det})"),
        format: Literal["json", "png"] | None = Query(
            None, description="png: the image with its boxes drawn (one image); default json, or by Accept"
        ),
    ):
        t0 = time.perf_counter()
        if not svc.model or not svc.batcher or svc.shutting_down:
            what = "shutting down" if svc.shutting_down else "loading the model"
            return error_response(503, f"the server is {what}", "unavailable", headers={"Retry-After": "5"})
        model = svc.model
        params = _params(settings, conf, iou, max_det)
        want_png = format == "png" or (format is None and _prefers_png(request.headers.get("accept")))
        body = await request.body()  # read by the door already: this is the buffered body, not a copy
        ticket = request.scope.get(SCOPE_TICKET)
        (names, decoded, decode_s), decode_wait, prepare_s = await svc.run_cpu_timed(
            _prepare, body, request.headers.get("content-type"), settings, model.input_size, want_png, ticket,
            svc.metrics.stage,
        )  # fmt: skip
        del body
        svc.metrics.wait.labels("decode").observe(decode_wait)
        for s in decode_s:
            svc.metrics.stage.labels("decode").observe(s)
        batch = np.stack([d.pixels for d in decoded])
        for d in decoded:
            d.pixels = None  # the batch holds them now
        try:
            results = await asyncio.wait_for(svc.batcher.submit(batch), settings.request_timeout_s)
        except asyncio.TimeoutError:
            return error_response(504, f"no result within {settings.request_timeout_s:g} s", "timeout")
        del batch
        queue_s = max(r.queued_s for r in results)
        svc.metrics.wait.labels("inference").observe(queue_s)
        names_of = model.class_names

        def finish(timing: dict[str, float], t_submit: float):
            from attn_export.detection.postprocess import postprocess

            t_start = time.perf_counter()
            preds = np.stack([r.output for r in results])
            dets = postprocess(preds, conf=params.conf, iou=params.iou, max_det=params.max_det)
            out = []
            for d, (boxes, scores, cls) in zip(decoded, dets, strict=True):
                out.append((d.to_original(boxes), scores, cls))
            if want_png:
                boxes, scores, cls = out[0]
                png = draw(decoded[0].full, boxes, scores, [names_of[int(c)] for c in cls], cls)
                return png, len(out[0][1]), 0, time.perf_counter() - t_start
            post_s = time.perf_counter() - t_start
            timing = timing | {
                "postprocess_wait": t_start - t_submit,
                "postprocess": post_s,
                "total": time.perf_counter() - t0,
            }
            answer = DetectResponse(
                model=model.name,
                backend=model.backend,
                input_size=model.input_size,
                params=params,
                images=[
                    ImageResult(
                        index=i,
                        filename=names[i][0],
                        width=d.width,
                        height=d.height,
                        format=d.format,
                        batch_size=r.batch_size,
                        detections=[
                            Detection(
                                box=[round(float(v), 2) for v in b],
                                score=round(float(sc), 5),
                                class_id=int(c),
                                class_name=names_of[int(c)],
                            )
                            for b, sc, c in zip(boxes, scores, cls, strict=True)
                        ],
                        timings=ImageTimings(
                            decode_ms=decode_s[i] * 1000,
                            queue_ms=r.queued_s * 1000,
                            inference_ms=r.infer_s * 1000,
                            postprocess_ms=post_s * 1000,
                        ),
                    )
                    for i, (d, r, (boxes, scores, cls)) in enumerate(zip(decoded, results, out, strict=True))
                ],
                timings=Timings(**{f"{k}_ms": v * 1000 for k, v in timing.items()}),
            )
            return answer.model_dump_json().encode(), sum(len(sc) for _, sc, _ in out), post_s, timing["total"]

        timing = {
            "decode": prepare_s,
            "decode_wait": decode_wait,
            "queue": queue_s,
            "inference": max(r.infer_s for r in results),
        }
        (content, n_dets, post_s, _), post_wait, post_work = await svc.run_cpu_timed(
            finish, timing, time.perf_counter()
        )
        timing |= {"postprocess_wait": post_wait, "postprocess": post_s or post_work}
        svc.metrics.wait.labels("postprocess").observe(post_wait)
        svc.metrics.stage.labels("postprocess").observe(post_s or post_work)
        svc.metrics.images.inc(len(decoded))
        svc.metrics.detections.inc(n_dets)
        timing["total"] = time.perf_counter() - t0
        server_timing = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timing.items())
        if want_png:
            headers = {"Server-Timing": server_timing, "X-Detections": str(n_dets)}
            return Response(content, media_type="image/png", headers=headers)
        return Response(content, media_type="application/json", headers={"Server-Timing": server_timing})

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: the model is loaded and warmed up",
        responses={503: {"description": "not ready (loading, warming up or shutting down)"}},
    )
    async def readyz():
        if not svc.ready:
            reason = "shutting down" if svc.shutting_down else ("warming up" if svc.model else "loading the model")
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        m = svc.model
        return {
            "ready": True,
            "model": m.name,
            "path": str(m.path),
            "backend": m.backend,
            "provider": m.provider,
            "input_size": m.input_size,
            "classes": m.class_names,
            "max_batch": svc.batcher.max_batch,
            "max_in_flight": svc.door.max_requests,
            "version": __version__,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if svc.batcher is not None:
            svc.metrics.queue_depth.set(svc.batcher.depth)
        door = svc.door
        svc.metrics.admitted.set(door.requests)
        svc.metrics.reading.set(door.reading)
        svc.metrics.bytes_in_flight.set(door.bytes)
        svc.metrics.pixels_in_flight.set(door.pixels)
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((_static_dir() / "index.html").read_text(encoding="utf-8"))

    from attn_export.serve.v2_http import oip_router  # the Open Inference Protocol (/v2) beside /detect

    app.include_router(oip_router(svc))
    app.mount("/static", StaticFiles(directory=str(_static_dir())), name="static")
    svc.known_paths = {r.path for r in app.routes if hasattr(r, "path")}
    return app


def app_from_env() -> FastAPI:
    """The app with settings from ``ATTN_EXPORT_*`` (``uvicorn --factory`` and ``--workers N`` use it).

    It is the process's one app, so the header timeouts of this process's connections count in its metrics.
    """
    from attn_export.serve.door import set_timeout_hook

    app = create_app(Settings())
    closed = app.state.service.metrics.connections_closed
    set_timeout_hook(lambda reason: closed.labels(reason).inc())
    return app


__all__ = ["ModelError", "Settings", "app_from_env", "create_app"]
