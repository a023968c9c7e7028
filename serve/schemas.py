"""What ``/detect`` answers: the response models, the documented request body and errors, and the JSON
error form ``{"error": KIND, "detail": MESSAGE, "status": CODE}``."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from attn_export.detection.imaging import ACCEPTED


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


def describe_validation(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{where}: {err.get('msg', 'invalid')}{got}")
    return "; ".join(parts)
