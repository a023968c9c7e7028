"""``POST /detect``: images in (a multipart form or one raw image), boxes out (JSON, or a PNG with the
boxes drawn); a thin adapter over :meth:`attn_export.serve.service.Service.detect`."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Query, Request, Security
from fastapi.responses import Response
from fastapi.security import APIKeyHeader

from attn_export.detection.imaging import InputError, draw
from attn_export.detection.pipeline import Detected
from attn_export.serve.auth import API_KEY_HEADER
from attn_export.serve.door import SCOPE_TICKET
from attn_export.serve.forms import params_of, prefers_png, request_images
from attn_export.serve.schemas import (
    ERROR_RESPONSES,
    MULTIPART_BODY,
    Detection,
    DetectResponse,
    ImageResult,
    ImageTimings,
    Timings,
    error_response,
)
from attn_export.serve.service import Service

#: for the OpenAPI docs only: the key is checked before the body is read (serve/middleware.py)
API_KEY_SCHEME = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="needed when configured")


def _json(svc: Service, params, names: list[str | None], detected: Detected, t0: float) -> bytes:
    model = svc.model
    names_of = model.class_names
    decoding, timing = detected.decoding, detected.timing
    post_s = timing["postprocess"]
    timing = {k: timing[k] for k in ("decode", "decode_wait", "queue", "inference", "postprocess_wait")}
    timing |= {"postprocess": post_s, "total": time.perf_counter() - t0}
    answer = DetectResponse(
        model=model.name,
        backend=model.backend,
        input_size=model.input_size,
        params=params,
        images=[
            ImageResult(
                index=i,
                filename=names[i],
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
                    decode_ms=decoding.decode_s[i] * 1000,
                    queue_ms=r.queued_s * 1000,
                    inference_ms=r.infer_s * 1000,
                    postprocess_ms=post_s * 1000,
                ),
            )
            for i, (d, r, (boxes, scores, cls)) in enumerate(
                zip(decoding.decoded, detected.results, detected.dets, strict=True)
            )
        ],
        timings=Timings(**{f"{k}_ms": v * 1000 for k, v in timing.items()}),
    )
    return answer.model_dump_json().encode()


def detect_router(svc: Service) -> APIRouter:
    router = APIRouter()
    settings = svc.settings

    @router.post(
        "/detect",
        response_model=DetectResponse,
        summary="Detect objects in one or more images",
        responses={200: {"content": {"image/png": {}}, "description": "detections (JSON) or the annotated image"}}
        | ERROR_RESPONSES,
        openapi_extra={"requestBody": MULTIPART_BODY},
        dependencies=[Security(API_KEY_SCHEME)],
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
        params = params_of(settings, conf, iou, max_det)
        want_png = format == "png" or (format is None and prefers_png(request.headers.get("accept")))
        body = await request.body()  # read by the door already: this is the buffered body, not a copy
        content_type = request.headers.get("content-type")
        names: list[str | None] = []

        def images():  # on the CPU pool, with the decoding
            nonlocal body
            t = time.perf_counter()
            found = request_images(body, content_type, settings)
            body = b""
            if want_png and len(found) != 1:
                message = f"format=png draws one image; this request has {len(found)}"
                raise InputError(400, "png_needs_one_image", message)
            svc.metrics.stage.labels("parse").observe(time.perf_counter() - t)
            names.extend(name for name, _ in found)
            return [data for _, data in found], names

        def reply(detected: Detected):
            if want_png:
                boxes, scores, cls = detected.dets[0]
                labels = [svc.model.class_names[int(c)] for c in cls]
                return draw(detected.decoding.decoded[0].full, boxes, scores, labels, cls)
            return _json(svc, params, names, detected, t0)

        content, detected = await svc.detect(
            images, params, reply, budget=request.scope.get(SCOPE_TICKET), keep_full=want_png
        )
        timing = {k: detected.timing[k] for k in ("decode", "decode_wait", "queue", "inference", "postprocess_wait")}
        timing["postprocess"] = detected.timing["postprocess_work" if want_png else "postprocess"]
        timing["total"] = time.perf_counter() - t0
        server_timing = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in timing.items())
        if want_png:
            n_dets = len(detected.dets[0][1])
            headers = {"Server-Timing": server_timing, "X-Detections": str(n_dets)}
            return Response(content, media_type="image/png", headers=headers)
        return Response(content, media_type="application/json", headers={"Server-Timing": server_timing})

    return router
