"""The ``/detect`` request: its images (a multipart form or one raw image body), its parameters and
whether it asks for JSON or a PNG."""

from __future__ import annotations

import contextlib
from typing import Any

from attn_export.detection.imaging import ACCEPTED, MIME_TYPES, InputError
from attn_export.serve.schemas import Params
from attn_export.serve.settings import Settings


def prefers_png(accept: str | None) -> bool:
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


def params_of(settings: Settings, conf, iou, max_det) -> Params:
    return Params(
        conf=settings.conf if conf is None else conf,
        iou=settings.iou if iou is None else iou,
        max_det=settings.max_det if max_det is None else max_det,
    )


def parse_form(body: bytes, content_type: str, max_images: int, max_fields: int = 64) -> list[tuple[str | None, bytes]]:
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


def request_images(body: bytes, content_type: str | None, settings: Settings) -> list[tuple[str | None, bytes]]:
    """The request's images as ``(filename, bytes)``: multipart files, or a raw image body."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return parse_form(body, content_type or "", settings.max_images)
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
