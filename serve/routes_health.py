"""``GET /healthz`` (the process answers), ``/readyz`` (the model is loaded and warmed up, and the server is
not shutting down), ``/metrics`` (Prometheus) and ``/`` (a page to try the service)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from attn_export import __version__
from attn_export.serve.auth import API_KEY_HEADER, key_refused
from attn_export.serve.service import Service


def static_dir():
    return resources.files("attn_export.serve") / "static"


def health_router(svc: Service) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        summary="Readiness: the model is loaded and warmed up",
        description="`path` is the model's file name; its absolute path only with the server's API key.",
        responses={503: {"description": "not ready (loading, warming up or shutting down)"}},
    )
    async def readyz(request: Request):
        if not svc.ready:
            return JSONResponse({"ready": False, "reason": svc.not_ready_reason()}, status_code=503)
        m = svc.model
        key = svc.settings.api_key  # the probe is open: where the model lives is for the key's holders only
        trusted = key is not None and key_refused(key, request.headers.get(API_KEY_HEADER)) is None
        return {
            "ready": True,
            "model": m.name,
            "path": str(m.path) if trusted else Path(str(m.path)).name,
            "backend": m.backend,
            "provider": m.provider,
            "input_size": m.input_size,
            "classes": m.class_names,
            "max_batch": svc.batcher.max_batch,
            "max_in_flight": svc.door.max_requests,
            "version": __version__,
        }

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        if svc.batcher is not None:
            svc.metrics.queue_depth.set(svc.batcher.depth)
        door = svc.door
        svc.metrics.admitted.set(door.requests)
        svc.metrics.reading.set(door.reading)
        svc.metrics.bytes_in_flight.set(door.bytes)
        svc.metrics.pixels_in_flight.set(door.pixels)
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    @router.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse((static_dir() / "index.html").read_text(encoding="utf-8"))

    return router
