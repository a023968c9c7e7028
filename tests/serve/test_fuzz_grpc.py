"""A gRPC fuzzer: valid ``ModelInferRequest``s, mutated field by field and byte by byte, sent to a live
server (127.0.0.1, the stand-in detector) as raw bytes.

Every answer is OK or a status the client's input explains (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
RESOURCE_EXHAUSTED ...), never INTERNAL or UNKNOWN; the server's count of unexpected errors stays at 0, it
keeps answering, and its memory stays bounded. Time-bounded: see ``fuzzkit``.
"""

from __future__ import annotations

import struct

import pytest
from fuzzkit import budget, round_of, rss_mb, run_for
from hypothesis import given
from hypothesis import strategies as st
from serve_helpers import LiveServer, cell_square, free_port, make_image, make_settings

grpc = pytest.importorskip("grpc")
pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402

SECONDS = 5.0
#: a round of requests to the live server (small: the time budget is checked between rounds)
ROUND_TRIP = round_of(8)
#: the codes no client input may cause
BUGS = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}


@pytest.fixture(scope="module")
def server(standin_onnx):
    from attn_export.serve.app import create_app

    settings = make_settings(standin_onnx, warmup=False, max_body_bytes=256 * 1024, grpc_port=free_port())
    app = create_app(settings)
    with LiveServer(app) as live:
        live.app = app
        yield live


@pytest.fixture(scope="module")
def channel(server):
    port = server.app.state.service.grpc_port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch


def _valid(image: bytes, binary: bool, params: dict) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="standin", id="fuzz")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    if binary:
        request.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    else:
        tensor.contents.bytes_contents.append(image)
    for key, value in params.items():
        setattr(request.parameters[key], f"{type(value).__name__.replace('float', 'double')}_param", value)
    return request


FIELD_MUTATIONS = st.sampled_from(
    ["shape", "datatype", "name", "second input", "raw and contents", "raw count", "length prefix", "outputs",
     "model", "version", "param", "image bytes", "none"]
)  # fmt: skip


def _mutate_fields(request: pb.ModelInferRequest, what: str, data) -> None:
    tensor = request.inputs[0]
    if what == "shape":
        del tensor.shape[:]
        tensor.shape.extend(data.draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)))
    elif what == "datatype":
        tensor.datatype = data.draw(st.sampled_from(["FP32", "", "bytes", "BYTES\x00"]))
    elif what == "name":
        tensor.name = data.draw(
            st.text(max_size=10).filter(lambda t: t.encode("utf-8", "ignore") == t.encode("utf-8", "replace"))
        )
    elif what == "second input":
        request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    elif what == "raw and contents":
        tensor.contents.bytes_contents.append(b"x")
        request.raw_input_contents.append(b"\x01\x00\x00\x00x")
    elif what == "raw count":
        request.raw_input_contents.append(data.draw(st.binary(max_size=20)))
    elif what == "length prefix" and request.raw_input_contents:
        raw = bytearray(request.raw_input_contents[0])
        raw[:4] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
        request.raw_input_contents[0] = bytes(raw)
    elif what == "outputs":
        for name in data.draw(
            st.lists(st.sampled_from(["num_detections", "boxes", "", "detection_scores"]), max_size=3)
        ):
            request.outputs.add(name=name)
    elif what == "model":
        request.model_name = data.draw(st.sampled_from(["", "other", "standin ", "../standin"]))
    elif what == "version":
        request.model_version = data.draw(st.sampled_from(["", "1", "2", "-1", "01"]))
    elif what == "param":
        key = data.draw(st.sampled_from(["conf", "iou", "max_det", "other"]))
        kind = data.draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]))
        values = {
            "bool_param": st.booleans(),
            "int64_param": st.integers(-(2**63), 2**63 - 1),
            "uint64_param": st.integers(0, 2**64 - 1),
            "string_param": st.sampled_from(["0.5", "nan", "1e400", "", "lots", "²"]),
            "double_param": st.floats(allow_nan=True, allow_infinity=True),
        }
        setattr(request.parameters[key], kind, data.draw(values[kind]))
    elif what == "image bytes":
        junk = data.draw(st.binary(max_size=64))
        if request.raw_input_contents:
            request.raw_input_contents[0] = struct.pack("<I", len(junk)) + junk
        else:
            tensor.contents.bytes_contents[0] = junk


def _mutate_bytes(payload: bytes, data) -> bytes:
    out = bytearray(payload)
    for _ in range(data.draw(st.integers(0, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        at = data.draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del out[at : at + data.draw(st.integers(1, 16))]
        elif op == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "dup":
            out += out[at : at + data.draw(st.integers(1, 64))]
    return bytes(out)


def test_mutated_model_infer_requests_never_reach_the_last_guard(server, channel):
    svc = server.app.state.service
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    images = [make_image((96, 64), [cell_square(1, 0, 1)], fmt=fmt) for fmt in ("PNG", "JPEG", "BMP")]
    seen: dict[str, int] = {}
    before = rss_mb()
    # the unmutated request is answered (the fuzzer starts from requests that work)
    answer = pb.ModelInferResponse.FromString(call(_valid(images[0], True, {}).SerializeToString(), timeout=30))
    assert answer.model_name == "standin" and struct.unpack("<i", answer.raw_output_contents[0][:4])[0] >= 1

    @given(
        image=st.sampled_from(images),
        binary=st.booleans(),
        params=st.dictionaries(st.sampled_from(["conf", "iou", "max_det"]), st.floats(0.1, 0.9), max_size=2),
        what=FIELD_MUTATIONS,
        data=st.data(),
        byte_level=st.booleans(),
    )
    @ROUND_TRIP
    def check(image, binary, params, what, data, byte_level):
        request = _valid(image, binary, params)
        _mutate_fields(request, what, data)
        payload = request.SerializeToString()
        if byte_level:
            payload = _mutate_bytes(payload, data)
        try:
            answer = pb.ModelInferResponse.FromString(call(payload, timeout=30))
            code = "OK"
            assert answer.model_name == "standin" and len(answer.raw_output_contents) >= 1
        except grpc.RpcError as e:
            code = e.code().name
            assert code not in BUGS, (code, e.details(), what, payload[:200])
            assert e.details() and "\n" not in e.details()
        seen[code] = seen.get(code, 0) + 1

    run_for(budget(SECONDS), check)
    assert seen.get("INVALID_ARGUMENT", 0) >= 1, seen
    text = svc.metrics.render().decode()
    assert "attn_export_internal_errors_total{" not in text, text  # no label was ever counted
    assert 'code="INTERNAL"' not in text
    ready = pb.ServerReadyResponse.FromString(channel.unary_unary("/inference.GRPCInferenceService/ServerReady")(b""))
    assert ready.ready and svc.door.requests == 0 and svc.door.bytes == 0
    assert rss_mb() - before < 300, f"RSS grew by {rss_mb() - before:.0f} MiB"


def test_any_method_takes_any_bytes(channel):
    methods = ["ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig",
               "RepositoryIndex", "ModelInfer", "ModelStreamInfer", "NoSuchMethod"]  # fmt: skip

    @given(method=st.sampled_from(methods), payload=st.binary(max_size=100))
    @ROUND_TRIP
    def check(method, payload):
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        try:
            call(payload, timeout=30)
        except grpc.RpcError as e:
            assert e.code().name not in BUGS, (method, e.code(), e.details(), payload)

    run_for(budget(1.5), check)
