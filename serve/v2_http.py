"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) on ``attn-export serve``, beside ``/detect``.

The same model and the same micro-batcher as ``/detect``, behind the contract of
:mod:`attn_export.detection.contract` (the one the Triton repositories of ``attn-export triton`` answer), so
a client written for this server works against a Triton fleet and back:

- ``GET /v2`` (server metadata), ``GET /v2/health/live``, ``GET /v2/health/ready``;
- ``GET /v2/models/{name}[/versions/1]`` (model metadata) and ``.../ready``;
- ``GET /v2/models/{name}[/versions/1]/config``: the model config in Triton's JSON shape (what
  ``tritonclient``'s ``get_model_config`` returns); ``POST /v2/repository/index``;
- ``POST /v2/models/{name}[/versions/1]/infer``: JSON tensors, and the binary tensor data extension
  (``Inference-Header-Content-Length``; ``binary_data_size`` inputs; ``binary_data`` /
  ``binary_data_output`` outputs); gzip or deflate request and response bodies.

Errors are the protocol's ``{"error": MESSAGE}`` with a 4xx status for what the client sent, 503 (with
``Retry-After``) when the server is loading, busy or shutting down, 504 past the request timeout.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import time
import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Header, Path, Request, Security
from fastapi.responses import JSONResponse, Response

from attn_export import __version__
from attn_export.detection.contract import (
    INPUT,
    MODEL_VERSION,
    OUTPUT_TYPES,
    OUTPUTS,
    ContractError,
    image_bytes,
    request_params,
    shown,
    split_bytes,
)
from attn_export.serve.door import SCOPE_TICKET
from attn_export.serve.routes_detect import API_KEY_SCHEME
from attn_export.serve.schemas import V2_ERRORS, V2_INFER_BODY, V2_INFER_RESPONSES
from attn_export.serve.v2_protocol import (
    EXTENSIONS,
    SERVER_NAME,
    ProtocolError,
    check_input,
    defaults_of,
    infer_tensors,
    model_config_of,
    model_metadata,
    model_or_error,
    protocol_error,
)

HEADER_LENGTH = "inference-header-content-length"
LENGTH_DOC = "binary tensor data extension: the length of the JSON request at the start of the body (ASCII digits)"
#: the path parameters as the schema shows them
MODEL = Path(description="the model's name (GET /v2/repository/index lists it)")
VERSION = Path(description=f"the model's version: {MODEL_VERSION}")


def _without_version(handler):
    """``handler`` for the route without ``/versions/{version}``: no such parameter (version "")."""

    @functools.wraps(handler)
    async def run(*args, **kwargs):
        kwargs.setdefault("version", "")
        return await handler(*args, **kwargs)

    sig = inspect.signature(handler)
    run.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "version"])
    return run


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ request parsing
#: Content-Encoding names (case-insensitive, RFC 9110) -> zlib's wbits (31: gzip framing, 15: zlib framing)
CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
#: an ASCII decimal length, no sign, no spaces ('²'.isdigit() is True, int('²') fails)
_LENGTH = re.compile(r"[0-9]{1,18}")


def content_coding(header: str | None) -> str | None:
    """The one content coding of a request (``gzip``, ``x-gzip`` or ``deflate``, any case), None for none or
    ``identity``; :class:`ProtocolError` 415 for another coding or two of them."""
    codings = [c.strip().lower() for c in (header or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in CODINGS:
        raise ProtocolError(
            415, f"unsupported Content-Encoding {shown(header)}: send one of gzip, deflate or none (identity)"
        )
    return codings[0]


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` decoded from ``encoding`` (a Content-Encoding header) within ``limit`` bytes.

    gzip: every member (RFC 1952: a gzip body may be several members one after another, as ``gunzip``
    reads it); deflate: one zlib stream. Bytes after the end, or a stream cut short, are a 400, never dropped.
    """
    coding = content_coding(encoding)
    if coding is None:
        return body
    wbits = CODINGS[coding]
    out: list[bytes] = []
    total, rest, members = 0, body, 0
    while True:
        d = zlib.decompressobj(wbits=wbits)
        try:
            chunk = d.decompress(rest, limit + 1 - total)
        except zlib.error as e:
            where = f" (member {members + 1})" if members else ""
            raise ProtocolError(400, f"the {coding} request body does not decompress{where}: {e}") from e
        total += len(chunk)
        if total > limit or d.unconsumed_tail:
            raise ProtocolError(413, f"the request body decompresses to more than {limit:,} bytes")
        out.append(chunk)
        members += 1
        if not d.eof:
            raise ProtocolError(400, f"the {coding} request body is truncated: it ends inside its compressed data")
        rest = d.unused_data
        if not rest:
            break
        if wbits != 31 or not rest.startswith(b"\x1f\x8b"):
            raise ProtocolError(
                400, f"the {coding} request body has {len(rest):,} bytes after the end of its compressed data"
            )
    return out[0] if len(out) == 1 else b"".join(out)


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    try:
        return split_bytes(raw, count)
    except ContractError as e:
        raise ProtocolError(400, str(e)) from e


def _flatten(data: Any, limit: int) -> list:
    """The leaves of nested lists, in order (iterative: no recursion on client data); at most ``limit``
    (the caller compares the count with the shape)."""
    out: list = []
    stack = [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > limit:
                break
    return out


_END = object()


def load_json(head: bytes | str, what: str = "the inference request header") -> Any:
    """JSON from a client, or :class:`ProtocolError` 400 with a one-line reason (not JSON, not UTF-8, nested
    too deeply for the parser, a number with too many digits)."""
    try:
        return json.loads(head)
    except RecursionError:
        raise ProtocolError(400, f"{what} is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, bad UTF-8, an int past 4300 digits
        raise ProtocolError(400, f"{what} is not JSON: {str(e).splitlines()[0][:200]}") from None


def parse_infer(body: bytes, header_length: str | None, max_images: int) -> tuple[dict, list[bytes]]:
    """``(the request's JSON, the images)`` of an infer request; :class:`ProtocolError` for what breaks the protocol."""
    if header_length is not None:
        if not _LENGTH.fullmatch(header_length) or int(header_length) > len(body):
            raise ProtocolError(
                400, f"Inference-Header-Content-Length {shown(header_length)} is not a length within the body"
            )
        n = int(header_length)
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    req = load_json(head)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ProtocolError(400, "the inference request must be a JSON object with a list 'inputs'")
    if "id" in req and not (isinstance(req["id"], str) and _utf8(req["id"])):
        raise ProtocolError(400, f"the request 'id' must be a string of valid UTF-8 text, got {shown(req['id'])}")
    images: list[bytes] | None = None
    offset = 0
    for tensor in req["inputs"]:
        if not isinstance(tensor, dict):
            raise ProtocolError(400, "each entry of 'inputs' must be an object")
        name = tensor.get("name")
        params = tensor.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        shape = tensor.get("shape")
        check_input(name, tensor.get("datatype"), shape, max_images, given_twice=images is not None)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise ProtocolError(
                    400, f"input {INPUT!r}: binary_data_size {shown(size)} does not fit the binary data"
                )
            rows: list = _bytes_elements(binary[offset : offset + size], shape[0])
            offset += size
        else:
            if "data" not in tensor:
                raise ProtocolError(400, f"input {INPUT!r} has neither 'data' nor a binary_data_size parameter")
            rows = _flatten(tensor["data"], shape[0])
            if len(rows) != shape[0]:
                held = f"{len(rows)}" if len(rows) <= shape[0] else "more"
                raise ProtocolError(400, f"input {INPUT!r}: shape says {shape[0]} elements, 'data' holds {held}")
        try:
            images = [image_bytes(r) for r in rows]
        except ContractError as e:
            raise ProtocolError(400, str(e)) from e
    if images is None:
        raise ProtocolError(400, f"the request has no input {INPUT!r}")
    if offset != len(binary):
        raise ProtocolError(400, f"the body holds {len(binary) - offset} bytes of binary data that no input claims")
    return req, images


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def requested_outputs(req: dict) -> list[tuple[str, bool]]:
    """``(output name, binary?)`` in the order asked (all four when none are named)."""
    params = req.get("parameters") or {}
    binary_default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    asked = req.get("outputs")
    if asked is None:
        return [(name, binary_default) for name in OUTPUTS]
    if not isinstance(asked, list):
        raise ProtocolError(400, "'outputs' must be a list")
    out = []
    for entry in asked:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in OUTPUTS:
            raise ProtocolError(400, f"unexpected inference output {shown(name)}; the model has {', '.join(OUTPUTS)}")
        p = entry.get("parameters") or {}
        out.append((name, bool(p.get("binary_data", binary_default)) if isinstance(p, dict) else binary_default))
    return out


def _accepts(header: str | None) -> str | None:
    """gzip or deflate when the client's Accept-Encoding takes it (tritonclient's response compression)."""
    offered = {part.split(";")[0].strip().lower() for part in (header or "").split(",")}
    return next((e for e in ("gzip", "deflate") if e in offered), None)


def compress(response: Response, accept_encoding: str | None) -> Response:
    encoding = _accepts(accept_encoding)
    if encoding is None or len(response.body) < 1024:
        return response
    packed = zlib.compressobj(6, zlib.DEFLATED, 31 if encoding == "gzip" else 15)  # gzip or zlib framing
    data = packed.compress(response.body) + packed.flush()
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    headers["Content-Encoding"] = encoding
    return Response(data, status_code=response.status_code, headers=headers, media_type=response.media_type)


def infer_response(req: dict, model: str, tensors: dict[str, np.ndarray], outputs: list[tuple[str, bool]]) -> Response:
    body: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if "id" in req:
        body["id"] = req["id"]
    entries, chunks = [], []
    for name, binary in outputs:
        datatype, dtype = OUTPUT_TYPES[name]
        arr = np.ascontiguousarray(tensors[name], dtype=np.dtype(dtype).newbyteorder("<"))
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            data = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    body["outputs"] = entries
    if not chunks:
        return JSONResponse(body)
    head = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


# ------------------------------------------------------------------------------------------ the router
def oip_router(svc) -> APIRouter:
    """The ``/v2`` routes for a :class:`~attn_export.serve.service.Service` (read at request time: the model
    loads later)."""
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
    settings = svc.settings

    def guarded(handler):
        @functools.wraps(handler)
        async def run(*args, **kwargs):
            try:
                return await handler(*args, **kwargs)
            except Exception as e:
                answer = protocol_error(e, svc.metrics)
                if answer is None:
                    raise
                return error(answer.status, answer.message, answer.headers)

        return run

    @router.get("", summary="Server metadata")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @router.get("/health/live", summary="Liveness")
    async def live():
        return Response(status_code=200)

    @router.get("/health/ready", summary="Readiness")
    async def ready():
        if not svc.ready:
            return error(503, f"not ready: {svc.not_ready_reason()}", {"Retry-After": "5"})
        return Response(status_code=200)

    async def metadata(model: str = MODEL, version: str = VERSION):
        return model_metadata(svc, model_or_error(svc, model, version))

    async def model_ready(model: str = MODEL, version: str = VERSION):
        model_or_error(svc, model, version)
        if not svc.ready:
            return error(503, f"model {shown(model)} is not ready", {"Retry-After": "5"})
        return Response(status_code=200)

    async def config(model: str = MODEL, version: str = VERSION):
        return model_config_of(svc, model_or_error(svc, model, version))

    async def infer(
        request: Request,
        model: str = MODEL,
        version: str = VERSION,
        # for the schema only: the handler reads both headers from the request (a 400 in the protocol's form)
        _length: str | None = Header(None, alias="Inference-Header-Content-Length", description=LENGTH_DOC),
        _coding: str | None = Header(None, alias="Content-Encoding", description="gzip, deflate or identity"),
    ):
        t0 = time.perf_counter()
        # the API key is checked at the door (serve/middleware.py, PROTECTED_V2), before the body
        m = model_or_error(svc, model, version)
        if svc.shutting_down:
            raise ProtocolError(503, "the server is shutting down", {"Retry-After": "5"})
        ticket = request.scope.get(SCOPE_TICKET)  # the door's (serve/door.py): bytes and pixels in flight
        raw = await request.body()  # already buffered by the door: no copy
        encoding = request.headers.get("content-encoding")
        header_length = request.headers.get(HEADER_LENGTH)

        def parse() -> tuple[dict, list[bytes]]:
            # on the CPU pool, like /detect's form parsing: gunzip, JSON and base64 of up to max_body_bytes
            # would otherwise hold the event loop (and the probes) for tens of milliseconds
            body = _decompress(raw, encoding, settings.max_body_bytes)
            if ticket is not None and len(body) > len(raw):  # the decompressed body counts on the byte budget
                ticket.add_bytes(len(body) - len(raw))
            return parse_infer(body, header_length, settings.max_images)

        req, images = await svc.run_cpu(parse)
        try:
            params = request_params(
                req.get("parameters") if isinstance(req.get("parameters"), dict) else {}, defaults_of(settings)
            )
        except ContractError as e:
            raise ProtocolError(400, str(e)) from e
        outputs = requested_outputs(req)
        tensors = await infer_tensors(svc, images, params, ticket)
        accept_encoding = request.headers.get("accept-encoding")
        # the response body and its compression on the pool too, like the parsing
        response = await svc.run_cpu(lambda: compress(infer_response(req, m.name, tensors, outputs), accept_encoding))
        response.headers["Server-Timing"] = f"total;dur={(time.perf_counter() - t0) * 1000:.2f}"
        return response

    async def repository_index(request: Request):
        m = svc.model
        if m is None:
            return []
        return [{"name": m.name, "version": MODEL_VERSION, "state": "READY" if svc.ready else "UNAVAILABLE"}]

    errors = V2_ERRORS

    def plain(handler):
        return _without_version(guarded(handler))

    for prefix, wrap in (("/models/{model}", plain), ("/models/{model}/versions/{version}", guarded)):
        get = functools.partial(router.add_api_route, methods=["GET"], responses=errors)
        get(prefix, wrap(metadata), summary="Model metadata")
        get(f"{prefix}/ready", wrap(model_ready), summary="Model readiness")
        get(f"{prefix}/config", wrap(config), summary="Model config")
        router.add_api_route(
            f"{prefix}/infer",
            wrap(infer),
            methods=["POST"],
            summary="Inference: images in, the four detection tensors out",
            responses=V2_INFER_RESPONSES,
            openapi_extra={"requestBody": V2_INFER_BODY},
            dependencies=[Security(API_KEY_SCHEME)],
        )
    router.add_api_route("/repository/index", repository_index, methods=["POST"], summary="Repository index")
    return router
