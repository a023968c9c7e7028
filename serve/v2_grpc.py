"""The Open Inference Protocol over gRPC (KServe v2, Triton's ``inference.GRPCInferenceService``).

Off unless ``grpc_port`` is set (``attn-export serve --grpc-port N``). The service definition is the one
``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``), so an unchanged
``tritonclient.grpc`` client talks to ``attn-export serve`` as it does to Triton. A ``grpc.aio`` server
runs on the app's event loop, started in the app's lifespan once the model is loaded and stopped
gracefully before the batcher closes; it answers from the same :class:`~attn_export.serve.service.Service`
as ``/detect`` and ``/v2`` (the protocol of :mod:`attn_export.serve.v2_protocol`): the same model, the same
detection pipeline, micro-batcher and bounds. Every ``ModelInfer`` goes through the service's admission door
(:mod:`attn_export.serve.door`: requests, bytes and image pixels in flight) before its message is read, in
the same byte budget as HTTP (:func:`door_first`); a message is at most ``max_body_bytes``.

RPCs: ``ServerLive``, ``ServerReady``, ``ServerMetadata``, ``ModelReady``, ``ModelMetadata``,
``ModelConfig`` (the ``/config`` answer as a ``ModelConfig`` message), ``RepositoryIndex`` and
``ModelInfer`` (the BYTES input ``image`` in ``raw_input_contents``, 4-byte little-endian
length-prefixed elements, or in ``contents.bytes_contents``; the outputs in ``raw_output_contents``;
request parameters ``conf``, ``iou``, ``max_det``). The others answer UNIMPLEMENTED.

Errors are gRPC status codes: INVALID_ARGUMENT for what the client sent (an unparsable protobuf too: the
RPCs are registered to take their requests as bytes and parse them themselves, see :class:`Registrar`;
grpc would answer UNKNOWN when its deserializer raised), NOT_FOUND for an unknown
model or version, UNAUTHENTICATED without the API key (metadata ``x-api-key``) when the server has
one, UNAVAILABLE when the server is loading, busy or shutting down (the message and the trailing
metadata ``retry-after`` say how many seconds to wait), DEADLINE_EXCEEDED past ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from attn_export import __version__
from attn_export.detection.contract import (
    MODEL_VERSION,
    OUTPUT_TYPES,
    OUTPUTS,
    ContractError,
    image_bytes,
    request_params,
)
from attn_export.detection.contract import split_bytes as _split_bytes
from attn_export.serve import v2_protocol as v2
from attn_export.serve.auth import key_refused
from attn_export.serve.door import UNSEEN_GRACE_S
from attn_export.serve.v2_protocol import ProtocolError

log = logging.getLogger("attn_export.serve")

#: HTTP statuses of :class:`~attn_export.serve.v2_protocol.ProtocolError` -> gRPC status code names
STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_HTTP_HINT = "retry after the time in Retry-After"


def _code_name(status: int) -> str:
    return STATUS_CODES.get(status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")


def missing_dependency() -> str | None:
    """Why the gRPC server cannot run here (its packages are missing), or None."""
    import importlib.util

    for module in ("grpc", "tritonclient.grpc"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            return f"--grpc-port needs {module}: pip install 'attn-export[grpc]' (tritonclient[grpc])"
    return None


def _parameter(p) -> Any:
    """An ``InferParameter``'s value (its one set field), or None when none is set."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _retry_text(message: str, retry_after: str) -> str:
    hint = f"retry after {retry_after} s"
    return message.replace(_HTTP_HINT, hint) if _HTTP_HINT in message else f"{message}; {hint}"


def infer_images(request, max_images: int) -> list[bytes]:
    """The images of a ``ModelInferRequest`` (:class:`ProtocolError` 400 for what breaks the contract)."""
    if not request.inputs:
        raise ProtocolError(400, "the request has no input 'image'")
    for i, tensor in enumerate(request.inputs):
        v2.check_input(tensor.name, tensor.datatype, list(tensor.shape), max_images, given_twice=i > 0)
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise ProtocolError(400, f"raw_input_contents holds {len(raw)} entries for the request's one input")
        if tensor.HasField("contents"):
            raise ProtocolError(400, "input 'image' has both contents and raw_input_contents: send one")
        try:
            rows: list = _split_bytes(raw[0], shape[0])
        except ContractError as e:
            raise ProtocolError(400, str(e)) from e
    else:
        rows = list(tensor.contents.bytes_contents)
        if len(rows) != shape[0]:
            raise ProtocolError(
                400, f"input 'image': shape says {shape[0]} elements, contents.bytes_contents holds {len(rows)}"
            )
    try:
        return [image_bytes(r) for r in rows]
    except ContractError as e:
        raise ProtocolError(400, str(e)) from e


def requested_outputs(request) -> list[str]:
    """The outputs a ``ModelInferRequest`` asks for, in its order (all four when it names none)."""
    asked = [o.name for o in request.outputs] or list(OUTPUTS)
    for name in asked:
        if name not in OUTPUTS:
            raise ProtocolError(400, f"unexpected inference output {name!r}; the model has {', '.join(OUTPUTS)}")
    return asked


def infer_response(pb, request, model: str, tensors: dict[str, np.ndarray], asked: list[str]):
    """A ``ModelInferResponse`` with the outputs ``asked`` in ``raw_output_contents``."""
    response = pb.ModelInferResponse(model_name=model, model_version=MODEL_VERSION, id=request.id)
    for name in asked:
        datatype, dtype = OUTPUT_TYPES[name]
        arr = np.ascontiguousarray(tensors[name], dtype=np.dtype(dtype).newbyteorder("<"))
        response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        response.raw_output_contents.append(arr.tobytes())
    return response


def make_servicer(svc):
    """A ``GRPCInferenceServiceServicer`` answering from ``svc`` (a :class:`~attn_export.serve.service.Service`)."""
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2, service_pb2_grpc
    from tritonclient.grpc import service_pb2 as pb

    settings = svc.settings

    async def fail(context, e: ProtocolError):
        code = getattr(grpc.StatusCode, _code_name(e.status))
        message = e.message
        metadata = ()
        retry = (e.headers or {}).get("Retry-After")
        if e.status == 503 and retry is not None:
            message = _retry_text(message, retry)
            metadata = (("retry-after", str(retry)),)
        await context.abort(code, message, trailing_metadata=metadata)

    def guarded(method: str, handler):
        counter = svc.metrics.grpc_requests
        request_type = getattr(pb, f"{method}Request")

        async def run(self, request, context):
            code = "CANCELLED"  # unless it ends otherwise: the client left, or the server stopped
            try:
                if isinstance(request, bytes):  # registered by register(): the message arrives unparsed
                    request = parse_request(request_type, request)
                response = await handler(request, context)
                code = "OK"
                return response
            except Exception as e:
                answer = v2.protocol_error(e, svc.metrics)
                if answer is None:  # the last guard: a bug, never a client's input
                    code = "INTERNAL"
                    svc.metrics.internal_errors.labels(f"/{SERVICE}/{method}").inc()
                    log.exception("gRPC %s failed", method)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
                code = _code_name(answer.status)
                await fail(context, answer)
            finally:
                counter.labels(method, code).inc()

        run.__name__ = method
        return run

    async def server_live(request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(request, context):
        return pb.ServerReadyResponse(ready=svc.ready)

    async def server_metadata(request, context):
        return pb.ServerMetadataResponse(name=v2.SERVER_NAME, version=__version__, extensions=v2.EXTENSIONS)

    async def model_ready(request, context):
        try:
            v2.model_or_error(svc, request.name, request.version)
        except ProtocolError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=svc.ready)

    async def metadata(request, context):
        meta = v2.model_metadata(svc, v2.model_or_error(svc, request.name, request.version))
        response = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for field in ("inputs", "outputs"):
            for t in meta[field]:
                getattr(response, field).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return response

    async def config(request, context):
        config = v2.model_config_of(svc, v2.model_or_error(svc, request.name, request.version))
        message = json_format.ParseDict(config, model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=message)

    async def repository_index(request, context):
        response = pb.RepositoryIndexResponse()
        m = svc.model
        if m is not None:
            state = "READY" if svc.ready else "UNAVAILABLE"
            response.models.add(name=m.name, version=MODEL_VERSION, state=state)
        return response

    async def infer(request, context):
        refused = key_refused(settings.api_key, dict(context.invocation_metadata() or ()).get("x-api-key"), "x-api-key")
        if refused is not None:
            raise ProtocolError(401, refused)
        m = v2.model_or_error(svc, request.model_name, request.model_version)
        if svc.shutting_down:
            raise ProtocolError(503, "the server is shutting down", {"Retry-After": "5"})
        # the message arrived whole (at most max_body_bytes): through the door at once
        with svc.door.passage(request.ByteSize(), svc.on_idle) as ticket:
            images = infer_images(request, settings.max_images)
            given = {k: _parameter(v) for k, v in request.parameters.items()}
            try:
                params = request_params(given, v2.defaults_of(settings))
            except ContractError as e:
                raise ProtocolError(400, str(e)) from e
            asked = requested_outputs(request)
            tensors = await v2.infer_tensors(svc, images, params, ticket)
            return infer_response(pb, request, m.name, tensors, asked)

    handlers = {
        "ServerLive": server_live,
        "ServerReady": server_ready,
        "ServerMetadata": server_metadata,
        "ModelReady": model_ready,
        "ModelMetadata": metadata,
        "ModelConfig": config,
        "RepositoryIndex": repository_index,
        "ModelInfer": infer,
    }
    methods = {name: guarded(name, handler) for name, handler in handlers.items()}
    servicer_class = type("AttnExportInferenceService", (service_pb2_grpc.GRPCInferenceServiceServicer,), methods)
    return servicer_class(), Registrar(pb, list(handlers))


SERVICE = "inference.GRPCInferenceService"


def parse_request(request_type, data: bytes):
    """``data`` as a ``request_type`` message; :class:`ProtocolError` 400 (INVALID_ARGUMENT) when it does not
    parse (grpc answers UNKNOWN when a registered deserializer raises, so the servicer parses itself)."""
    from google.protobuf.message import DecodeError

    try:
        return request_type.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:  # upb: DecodeError; also bad UTF-8 in a string field
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        message = f"the request is not a valid {request_type.__name__} protobuf message: {reason}"
        raise ProtocolError(400, message) from None


class Registrar:
    """What :func:`make_servicer` hands ``start_grpc`` to register the servicer with (the one method of the
    generated ``service_pb2_grpc`` module it calls): the RPCs take their requests unparsed (``bytes``) and each
    parses its own, so an unparsable message is INVALID_ARGUMENT with a reason; the RPCs not served are left to
    grpc (UNIMPLEMENTED)."""

    def __init__(self, pb, methods: list[str]) -> None:
        self.pb = pb
        self.methods = methods

    def add_GRPCInferenceServiceServicer_to_server(self, servicer, server) -> None:
        import grpc

        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name),
                request_deserializer=None,  # bytes in: parsed by the method (parse_request)
                response_serializer=getattr(self.pb, f"{name}Response").SerializeToString,
            )
            for name in self.methods
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def door_first(svc, handler, max_message: int):
    """``handler`` (ModelInfer's unary method handler) as a handler that goes through the service's door
    *before* its message is received: the call is admitted (the API key first) with a reservation of
    ``max_message`` bytes, its one message is then read (within ``body_timeout_s``), the reservation
    becomes the message's size, and the unary behaviour runs with that ticket (``Door.passage`` takes it).
    A call the door refuses is UNAVAILABLE with ``retry-after`` before a byte of its message is read, so
    what gRPC buffers for calls the door has not seen is only HTTP/2's flow-control window."""
    import grpc

    from attn_export.serve.door import Busy, shed

    door, settings, metrics = svc.door, svc.settings, svc.metrics
    behaviour, parse = handler.unary_unary, handler.request_deserializer

    async def refuse(context, code: str, message: str, metadata=()) -> None:
        metrics.grpc_requests.labels("ModelInfer", code).inc()
        idle_later()
        await context.abort(getattr(grpc.StatusCode, code), message, trailing_metadata=metadata)

    async def admit_then_read(_requests, context):  # read with context.read() (see below)
        given = dict(context.invocation_metadata() or ()).get("x-api-key")
        refused = key_refused(settings.api_key, given, "x-api-key")
        if refused is not None:  # before the door: a client without the key takes no room there
            await refuse(context, "UNAUTHENTICATED", refused)
        loop = asyncio.get_running_loop()
        lost = asyncio.Event()
        try:
            ticket = await door.enter(
                max_message, watched=False, on_reclaim=lambda: loop.call_soon_threadsafe(lost.set)
            )
        except Busy as e:
            retry = str(e.retry_after)
            shed(e, metrics)
            await refuse(context, "UNAVAILABLE", _retry_text(e.message, retry), (("retry-after", retry),))
        answered = False
        try:
            # context.read(), not the request iterator: an iterator left after one message keeps that message
            # alive after the call (40 x 19 MiB stayed in RSS)
            deadline = loop.time() + settings.body_timeout_s
            read = asyncio.ensure_future(context.read())
            reclaimed = asyncio.ensure_future(lost.wait())
            try:
                done, _ = await asyncio.wait(
                    {read, reclaimed}, timeout=settings.body_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            except asyncio.CancelledError:  # the call ended (the client left): no task left behind
                read.cancel()
                raise
            finally:
                reclaimed.cancel()
            if read not in done:
                read.cancel()
                if lost.is_set():
                    retry = str(door.retry_after())
                    message = (
                        f"the request message did not arrive within {UNSEEN_GRACE_S:g} s while its room was needed; "
                        f"retry after {retry} s"
                    )
                    await refuse(context, "UNAVAILABLE", message, (("retry-after", retry),))
                message = f"the request message did not arrive within {settings.body_timeout_s:g} s"
                await refuse(context, "DEADLINE_EXCEEDED", message)
            raw = read.result()
            read = done = None  # the task held the message too
            if raw is grpc.aio.EOF:
                await refuse(context, "INVALID_ARGUMENT", "the call carried no ModelInferRequest message")
            try:  # the end of the stream (a unary client half-closes with its message)
                end = await asyncio.wait_for(context.read(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                end = None
            if end is not grpc.aio.EOF:
                await refuse(context, "INVALID_ARGUMENT", "ModelInfer takes one request message, then the stream's end")
            try:
                ticket.settle(len(raw))
            except Busy as e:
                retry = str(e.retry_after)
                shed(e, metrics)
                await refuse(context, "UNAVAILABLE", _retry_text(e.message, retry), (("retry-after", retry),))
            if parse is not None:
                try:
                    raw = parse(raw)
                except Exception as e:  # whatever the parser says, it is about the client's message
                    await refuse(context, "INVALID_ARGUMENT", f"the request is not a ModelInferRequest: {e}")
            message = [raw]
            del raw  # the behaviour holds the message alone: it can drop the bytes once parsed
            with door.pre_admitted(ticket):
                response = await behaviour(message.pop(), context)
            answered = True
            return response
        finally:
            door.leave(ticket, answered, svc.on_idle)
            idle_later()

    trailing: list = [None]

    def idle_later() -> None:
        """Once no ModelInfer has ended for a second and a half and the door is empty, hand memory back again:
        grpc frees a call's buffers after its handler returns (after the door's own on_idle ran)."""
        if trailing[0] is not None:
            trailing[0].cancel()

        def fire() -> None:
            trailing[0] = None
            if door.requests == 0 and door.reading == 0:
                svc.on_idle()

        trailing[0] = asyncio.get_running_loop().call_later(1.5, fire)

    return grpc.stream_unary_rpc_method_handler(
        admit_then_read, request_deserializer=None, response_serializer=handler.response_serializer
    )


def _door_interceptor(svc, max_message: int):
    """A ``grpc.aio`` server interceptor that puts ``ModelInfer`` through the door before its message is read
    (:func:`door_first`); the other RPCs carry no payload and pass as they are."""
    import grpc

    class DoorInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            if handler is None or handler.unary_unary is None or not details.method.endswith("/ModelInfer"):
                return handler
            return door_first(svc, handler, max_message)

    return DoorInterceptor()


async def start_grpc(svc):
    """A started ``grpc.aio`` server for ``svc`` on ``settings.host:settings.grpc_port`` (port 0: any free
    port); ``svc.grpc_port`` is the port bound.

    Memory: gRPC is inside the same byte budget as HTTP. ``ModelInfer`` goes through the door before its
    message is received (:func:`door_first`); HTTP/2's BDP probing is off, so a call not yet read holds
    at most the 64 KiB flow-control window of its stream (with it on, grpc grew each window to several MiB,
    and 40 unread 19 MiB calls took 260 MB); a message is at most ``max_body_bytes``."""
    import grpc

    settings = svc.settings
    servicer, service_pb2_grpc = make_servicer(svc)
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),  # worker processes share the port
        ("grpc.http2.bdp_probe", 0),  # unread streams keep the 64 KiB window (see above)
    ]
    server = grpc.aio.server(
        options=options,
        maximum_concurrent_rpcs=settings.max_connections,
        interceptors=[_door_interceptor(svc, settings.max_body_bytes)],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = _address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio raises on a taken port
        raise RuntimeError(f"gRPC: cannot listen on {address} (is the port taken?)") from e
    if port == 0:
        raise RuntimeError(f"gRPC: cannot listen on {address}")
    await server.start()
    svc.grpc_port = port
    log.info("gRPC (KServe v2) on %s", _address(settings.host, port))
    return server


async def stop_grpc(server, grace_s: float) -> None:
    """Refuse new RPCs, let those in flight finish within ``grace_s``, then cancel the rest."""
    await server.stop(grace_s)
