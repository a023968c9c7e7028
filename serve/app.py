"""The detection service: a FastAPI app made by :func:`create_app` (the model loads in its lifespan).

Endpoints: ``POST /detect`` (images in, boxes out: JSON, or a PNG with the boxes drawn), ``GET /healthz``
(the process answers), ``GET /readyz`` (the model is loaded and warmed up, and the server is not
shutting down), ``GET /metrics`` (Prometheus), ``GET /`` (a page to try it), the Open Inference Protocol
under ``/v2`` (and over gRPC with ``grpc_port``), ``/docs`` and ``/openapi.json``.

A request's path: the limits middleware counts it and checks the API key; the door
(:mod:`attn_export.serve.door`) admits it within the bounds on requests and bytes in flight (else
503 with Retry-After, before the body is read), then reads the body up to ``max_body_bytes`` (413
beyond it, before any parsing) within ``body_timeout_s`` (408 beyond); the route, a thin adapter, hands
the request to the :class:`~attn_export.serve.service.Service`'s detection pipeline
(:mod:`attn_export.detection.pipeline`): the images decoded on the service's CPU pool within the pixels
in flight, run with the images of other requests in one inference call by the
:class:`~attn_export.serve.batching.Batcher`, NMS and the answer on the CPU pool again. The event loop
only moves bytes, so the probes stay fast at any load.

Errors are JSON ``{"error": KIND, "detail": MESSAGE, "status": CODE}``, 4xx for anything a client sent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from attn_export import __version__
from attn_export.detection.imaging import InputError
from attn_export.detection.loader import ModelError, ServedModel, load
from attn_export.serve.batching import BatcherClosed
from attn_export.serve.docs import add_docs
from attn_export.serve.door import Busy, shed
from attn_export.serve.middleware import add_limits, route_label
from attn_export.serve.routes_detect import detect_router
from attn_export.serve.routes_health import health_router, static_dir
from attn_export.serve.schemas import describe_validation, error_response
from attn_export.serve.service import NoResult, Service
from attn_export.serve.settings import Settings
from attn_export.serve.v2_http import oip_router

log = logging.getLogger("attn_export.serve")


def _add_error_handlers(app: FastAPI, svc: Service, route_table: list) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, exc.detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        svc.metrics.rejected.labels("parameter").inc()
        return error_response(422, describe_validation(list(exc.errors())), "invalid_parameter")

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        svc.metrics.rejected.labels(exc.kind).inc()
        return error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return error_response(503, exc.message, "busy", headers=shed(exc, svc.metrics))

    @app.exception_handler(BatcherClosed)
    async def _closed(request: Request, exc: BatcherClosed):
        return error_response(503, str(exc), "shutting_down", headers={"Retry-After": "5"})

    @app.exception_handler(NoResult)
    async def _no_result(request: Request, exc: NoResult):
        return error_response(504, str(exc), "timeout")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # the last guard: every parse of client data answers 4xx before this; reaching it is a bug
        route = route_label(request.scope, svc.known_paths, route_table)
        svc.metrics.internal_errors.labels(route).inc()
        log.error("unexpected error on %s %s (route %s)", request.method, request.url.path, route, exc_info=exc)
        message = f"internal error: {type(exc).__name__}"
        if request.url.path.startswith("/v2"):  # the protocol's error form
            return JSONResponse({"error": message}, status_code=500)
        return error_response(500, message, "internal_error")


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
        docs_url=None,  # /docs is served by add_docs: Swagger UI from the package, not from a CDN
        redoc_url=None,
    )
    app.state.service = svc
    route_table: list = []  # the routes, once they exist: the labels of what is answered before routing
    add_limits(app, svc, route_table)
    _add_error_handlers(app, svc, route_table)
    own = [detect_router(svc), health_router(svc), oip_router(svc)]  # /v2: the Open Inference Protocol
    for router in own:
        app.include_router(router)
    add_docs(app)  # before /static: it mounts /static/swagger-ui
    app.mount("/static", StaticFiles(directory=str(static_dir())), name="static")
    # the route labels of the request metrics (FastAPI keeps an included router's routes in the router)
    routes = [*app.routes, *(route for router in own for route in router.routes)]
    svc.known_paths = {r.path for r in routes if getattr(r, "path", None)}
    route_table.extend(r for r in routes if getattr(r, "path", None) and hasattr(r, "matches"))
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
