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


# ------------------------------------------------------------------------------------------ /v2 (documentation)
# The Open Inference Protocol's bodies, for the OpenAPI schema (/docs, schemathesis): the routes of
# serve/v2_http.py read the raw body themselves (binary extension, compression), so these only describe it.
_PARAMETERS = {
    "type": "object",
    "description": "conf, iou (in [0, 1]) and max_det (1 to the model's max_det) override the model's defaults",
    "properties": {
        "conf": {"type": "number", "minimum": 0, "maximum": 1},
        "iou": {"type": "number", "minimum": 0, "maximum": 1},
        "max_det": {"type": "integer", "minimum": 1},
        "binary_data_output": {"type": "boolean", "description": "all outputs as binary data"},
    },
}
V2_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string", "description": "echoed in the response"},
        "parameters": _PARAMETERS,
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "datatype", "shape"],
                "properties": {
                    "name": {"type": "string", "enum": ["image"]},
                    "datatype": {"type": "string", "enum": ["BYTES"]},
                    "shape": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1},
                        "minItems": 2,
                        "maxItems": 2,
                        "description": "[batch, 1]",
                    },
                    "data": {
                        "type": "array",
                        "items": {"type": "string", "description": "an encoded image in base64"},
                        "description": "one encoded image (JPEG, PNG, WebP, BMP) per row, in base64",
                    },
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "binary_data_size": {
                                "type": "integer",
                                "minimum": 0,
                                "description": "the input's bytes after the JSON (binary tensor data extension)",
                            }
                        },
                    },
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {
                        "type": "string",
                        "enum": ["num_detections", "detection_boxes", "detection_scores", "detection_classes"],
                    },
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            },
        },
    },
}
V2_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": V2_INFER_REQUEST},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": "binary tensor data extension: the JSON request (its length in the "
            "Inference-Header-Content-Length header), then each input's bytes (4-byte little-endian length, "
            "then the image) as its binary_data_size says",
        },
    },
}
V2_TENSOR = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {}},
        "parameters": {"type": "object"},
    },
}


class V2Error(BaseModel):
    error: str = Field(description="what is wrong, in one line")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[dict[str, Any]] = Field(
        description="num_detections INT32 [batch, 1], detection_boxes FP32 [batch, max_det, 4] (x1, y1, x2, y2 in "
        "original pixels), detection_scores FP32 [batch, max_det], detection_classes INT32 [batch, max_det]"
    )


V2_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": text}
    for code, text in {
        400: "a request that breaks the protocol or the model's contract",
        401: "missing or wrong X-API-Key (when the server has one)",
        404: "unknown model or version",
        408: "the body did not arrive within body_timeout_s",
        413: "body, decompressed body or image too large",
        415: "unsupported Content-Encoding or image type",
        503: "loading, busy or shutting down (Retry-After)",
        504: "the request waited too long for its results",
    }.items()
}
V2_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": V2InferResponse,
        "description": "the four outputs; with binary outputs, application/octet-stream: the JSON (its length in "
        "Inference-Header-Content-Length), then the outputs' bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **V2_ERRORS,
}
