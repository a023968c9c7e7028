"""The service's two outer layers, pure ASGI: :class:`LimitsMiddleware` (outermost: request metrics and
the API key of the inference routes) and, inside it, the admission door of
:mod:`attn_export.serve.door` (a request without its key takes no place); :func:`add_limits` puts both
on an app."""

from __future__ import annotations

import re
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match

from attn_export.serve.auth import key_refused
from attn_export.serve.door import SCOPE_DISCONNECTED, AdmissionMiddleware, scope_header
from attn_export.serve.schemas import error_response
from attn_export.serve.service import Service

PROTECTED_PATHS = ("/detect",)
#: The Open Inference Protocol's infer routes (serve/v2_http.py): refused at the door without the key too.
PROTECTED_V2 = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")


def route_label(scope, known_paths, routes=()) -> str:
    """The metrics label of a request: its route's template (``/v2/models/{model}/infer``), ``/static`` for
    the files, ``other`` for a path no route of the app matches (so clients cannot mint labels).

    A request answered before routing (by the door: 503, 413, 408; or 401 for the API key) is labelled by
    the first of ``routes`` its path matches."""
    label = getattr(scope.get("route"), "path", None)
    if label is None:
        for route in routes:
            if route.matches(scope)[0] != Match.NONE:
                label = route.path
                break
    if label is None:
        return "other"
    if label.startswith("/static"):
        return "/static"
    return label if label in known_paths else "other"


class LimitsMiddleware:
    """Pure ASGI, outermost: request metrics and the API key of protected paths (checked before the door).

    A request whose client went away before its answer (the door marks it) is counted as a disconnect,
    not by the status it never received.
    """

    def __init__(self, app, service: Service, routes: list | None = None) -> None:
        self.app = app
        self.service = service
        self.routes = routes if routes is not None else []  # the app's, filled in once they exist

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
            label = route_label(scope, svc.known_paths, self.routes)
            if not scope.get(SCOPE_DISCONNECTED):
                metrics.requests.labels(label, scope["method"], str(status_holder[0])).inc()
                metrics.latency.labels(label).observe(time.perf_counter() - t0)

    def _check(self, scope) -> Response | None:
        path = scope["path"]
        v2 = PROTECTED_V2.fullmatch(path) is not None
        if not (path in PROTECTED_PATHS or v2):
            return None
        message = key_refused(self.service.settings.api_key, scope_header(scope, b"x-api-key"))
        if message is None:
            return None
        self.service.metrics.rejected.labels("api_key").inc()
        if v2:  # the protocol's error form
            return JSONResponse({"error": message}, status_code=401)
        return error_response(401, message)


def add_limits(app: FastAPI, svc: Service, routes: list | None = None) -> None:
    """The door (innermost of the two: a request without its API key takes no place), then metrics and the key.

    ``routes``: the app's routes (a list the caller fills in once they exist), to label what is answered
    before routing."""
    settings = svc.settings
    app.add_middleware(
        AdmissionMiddleware,
        door=svc.door,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        metrics=svc.metrics,
        on_idle=svc.on_idle,
    )
    app.add_middleware(LimitsMiddleware, service=svc, routes=routes)
