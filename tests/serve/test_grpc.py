"""``attn-export serve --grpc-port``: the Open Inference Protocol over gRPC, to an unchanged tritonclient.grpc.

On the stand-in detector (serve_helpers): its detections are known from the pictures, so the gRPC
answers are checked against them, against ``/detect`` and against the HTTP ``/v2`` answer of the same
server; and the gRPC path keeps the service's bounds (the admission door, the message size).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import re
import socket
import struct
import subprocess
import sys

import httpx
import numpy as np
import pytest
from serve_helpers import LiveServer, cell_square, client_for, free_port, make_image, make_settings

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from attn_export.detection import contract  # noqa: E402

NAME = "standin"


@contextlib.contextmanager
def grpc_client(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.app.state.service.grpc_port}")
    try:
        yield client
    finally:
        client.close()


class GrpcLive(LiveServer):
    def __init__(self, app) -> None:
        super().__init__(app)
        self.app = app


@pytest.fixture(scope="module")
def server(standin_onnx):
    from attn_export.serve.app import create_app

    settings = make_settings(
        standin_onnx, max_batch=4, max_wait_ms=5.0, max_body_bytes=1024 * 1024, max_pixels=4_000_000,
        grpc_port=free_port(),
    )  # fmt: skip
    with GrpcLive(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def scenes() -> list[bytes]:
    """Fresh random scenes: 1 to 4 squares of random colours in random cells, of random sizes and formats."""
    rng = np.random.default_rng(4711)
    out = []
    for i in range(5):
        w, h = int(rng.integers(200, 480)), int(rng.integers(200, 480))
        cells = rng.choice((min(w, h) // 32) ** 2, size=int(rng.integers(1, 5)), replace=False)
        n = min(w, h) // 32
        squares = [cell_square(int(rng.integers(0, 3)), int(c // n), int(c % n)) for c in cells]
        out.append(make_image((w, h), squares, fmt="PNG" if i % 2 else "BMP"))
    return out


def _image_input(data: list[bytes]):
    tensor = grpcclient.InferInput("image", [len(data), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=object).reshape(-1, 1))
    return tensor


def _rows(outputs: dict[str, np.ndarray]) -> list[list[tuple[list[float], float, int]]]:
    return [
        [(list(map(float, b)), float(s), int(c)) for b, s, c in zip(*image, strict=True)]
        for image in contract.unpack(outputs)
    ]


def _detect(server, data: bytes, **params) -> list[tuple[list[float], float, int]]:
    r = httpx.post(f"{server.url}/detect", files={"images": ("a", data)}, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return [(d["box"], d["score"], d["class_id"]) for d in r.json()["images"][0]["detections"]]


def _same(got, want) -> None:
    """``/detect`` rounds boxes to 0.01 px and scores to 1e-5."""
    assert [c for *_, c in got] == [c for *_, c in want]
    for (gb, gs, _), (wb, ws, _) in zip(got, want, strict=True):
        assert np.allclose(gb, wb, atol=0.01) and abs(gs - ws) <= 1e-5


def _code(info) -> str:
    return str(info.value.status())


# ------------------------------------------------------------------------------------------ tests
def test_grpc_is_off_by_default(standin_onnx):
    from attn_export.serve.cli import parser, settings_from_args
    from attn_export.serve.settings import Settings

    assert Settings(model=standin_onnx).grpc_port is None
    assert settings_from_args(parser().parse_args([str(standin_onnx), "--grpc-port", "8001"])).grpc_port == 8001
    with client_for(make_settings(standin_onnx)) as client:
        assert client.app.state.service.grpc_port is None  # nothing listens
    # and the app does not import grpc unless asked to
    code = "import sys; from attn_export.serve.app import create_app; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_grpc_port_without_its_packages_is_a_clear_error(standin_onnx, monkeypatch, capsys):
    import importlib.util

    from attn_export.serve import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "grpc" else real(name, *a))
    assert cli.main([str(standin_onnx), "--grpc-port", "0"]) == 2
    assert "attn-export[grpc]" in capsys.readouterr().err


def test_tritonclient_grpc_unchanged_against_our_server(server, scenes):
    from google.protobuf import json_format

    with grpc_client(server) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(NAME) and not client.is_model_ready("other")
        meta = client.get_server_metadata(as_json=True)
        assert meta["name"] == "attn-export" and "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata(NAME, as_json=True)
        assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1", "1"]}]
        assert [o["name"] for o in model["outputs"]] == list(contract.OUTPUTS)
        config = client.get_model_config(NAME).config
        http_config = httpx.get(f"{server.url}/v2/models/{NAME}/config").json()
        assert json_format.MessageToDict(config, preserving_proto_field_name=True) == json_format.MessageToDict(
            json_format.ParseDict(http_config, type(config)()), preserving_proto_field_name=True
        )
        assert config.max_batch_size == 16 and config.output[1].dims == [100, 4]
        assert client.get_model_repository_index().models[0].name == NAME
        result = client.infer(NAME, [_image_input(scenes)], request_id="r-7")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'^attn_export_grpc_requests_total\{code="OK",method="ModelInfer"\} [1-9]', metrics, re.M)
    assert result.get_response().id == "r-7"
    got = _rows({n: result.as_numpy(n) for n in contract.OUTPUTS})
    assert result.as_numpy("detection_boxes").shape == (len(scenes), 100, 4)
    # the same request over HTTP /v2 (JSON, base64 rows) answers the same tensors
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(scenes), 1],
                        "data": [base64.b64encode(s).decode() for s in scenes]}]}  # fmt: skip
    r = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    http = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    for n in contract.OUTPUTS:
        np.testing.assert_array_equal(result.as_numpy(n), http[n])
    total = 0
    for rows, data in zip(got, scenes, strict=True):
        want = _detect(server, data)
        _same(rows, want)
        total += len(want)
    assert total >= len(scenes)  # every scene has a square the stand-in finds


def test_grpc_answer_matches_the_pictures(server):
    """An independent check: a green square in cell (2, 3) of a 320 x 320 image is one class-1 box on that cell."""
    image = make_image((320, 320), [cell_square(1, 2, 3), cell_square(2, 7, 0)])
    with grpc_client(server) as client:
        result = client.infer(NAME, [_image_input([image])])
    (rows,) = _rows({n: result.as_numpy(n) for n in contract.OUTPUTS})
    assert sorted((c, b) for b, _, c in rows) == [(1, [96.0, 64.0, 128.0, 96.0]), (2, [0.0, 224.0, 32.0, 256.0])]


def test_grpc_request_parameters_and_bytes_contents(server, scenes):
    from tritonclient.grpc import service_pb2

    data = scenes[0]
    with grpc_client(server) as client:
        result = client.infer(NAME, [_image_input([data])], parameters={"conf": "0.5", "max_det": 1})
        assert result.as_numpy("detection_boxes").shape == (1, 100, 4)  # the output shape is the config's
        _same(_rows({n: result.as_numpy(n) for n in contract.OUTPUTS})[0], _detect(server, data, conf=0.5, max_det=1))
        # the same through the generated stub: contents.bytes_contents, a double parameter, two outputs asked
        request = service_pb2.ModelInferRequest(model_name=NAME)
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
        tensor.contents.bytes_contents.append(data)
        request.parameters["iou"].double_param = 0.3
        request.outputs.add(name="detection_scores")
        request.outputs.add(name="num_detections")
        response = client._client_stub.ModelInfer(request, timeout=30)
    assert [o.name for o in response.outputs] == ["detection_scores", "num_detections"]
    scores = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 100)
    k = int(np.frombuffer(response.raw_output_contents[1], "<i4")[0])
    want = _detect(server, data, iou=0.3)
    assert k == len(want) and np.allclose(scores[0, :k], [s for _, s, _ in want], atol=1e-5)


def _raw_request(payload: bytes, batch: int = 1):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="image", datatype="BYTES", shape=[batch, 1])
    request.raw_input_contents.append(payload)
    return request


def _with_output(request, name: str):
    request.outputs.add(name=name)
    return request


@pytest.mark.parametrize(
    "make, code, words",
    [
        (lambda img: [_image_input([b"these are not the pixels you are looking for" * 3])], "INVALID_ARGUMENT",
         "not an image"),
        (lambda img: [_image_input([img[: len(img) // 2]])], "INVALID_ARGUMENT", "PNG"),
        (lambda img: [grpcclient.InferInput("pixels", [1, 1], "BYTES")], "INVALID_ARGUMENT", "unexpected"),
        (lambda img: _raw_request(struct.pack("<I", 999) + img), "INVALID_ARGUMENT", "fewer remain"),
        (lambda img: _raw_request(struct.pack("<I", len(img)) + img, batch=2), "INVALID_ARGUMENT", "shape says 2"),
        (lambda img: _raw_request(b"", batch=17), "INVALID_ARGUMENT", "max_batch_size"),
        (lambda img: _with_output(_raw_request(struct.pack("<I", len(img)) + img), "boxes"), "INVALID_ARGUMENT",
         "unexpected inference output 'boxes'"),
    ],
    ids=["not an image", "truncated PNG", "wrong input name", "bad length prefix", "short batch", "batch too big",
         "unknown output"],
)  # fmt: skip
def test_grpc_bad_input_is_invalid_argument_and_the_server_goes_on(server, scenes, make, code, words):
    good = make_image((320, 320), [cell_square(0, 1, 1)])
    with grpc_client(server) as client:
        made = make(good)
        with pytest.raises(InferenceServerException) as info:
            if isinstance(made, list):
                if made[0].name() == "pixels":
                    made[0].set_data_from_numpy(np.array([[good]], dtype=object))
                client.infer(NAME, made)
            else:
                try:
                    client._client_stub.ModelInfer(made, timeout=30)
                except grpc.RpcError as e:
                    raise InferenceServerException(e.details(), status=str(e.code())) from e
        assert code in _code(info) and words in info.value.message()
        ok = client.infer(NAME, [_image_input([good])])
        assert int(ok.as_numpy("num_detections")[0, 0]) == 1
    assert server.app.state.service.door.requests == 0


def test_grpc_parameters_unknown_model_and_message_size(server, scenes):
    with grpc_client(server) as client:
        with pytest.raises(InferenceServerException, match="max_det") as info:
            client.infer(NAME, [_image_input(scenes[:1])], parameters={"max_det": 500})
        assert "INVALID_ARGUMENT" in _code(info)
        with pytest.raises(InferenceServerException, match="conf") as info:
            client.infer(NAME, [_image_input(scenes[:1])], parameters={"conf": "lots"})
        assert "INVALID_ARGUMENT" in _code(info)
        for call in (
            lambda: client.infer("other", [_image_input(scenes[:1])]),
            lambda: client.get_model_metadata("other"),
            lambda: client.get_model_config(NAME, model_version="2"),
        ):
            with pytest.raises(InferenceServerException, match="unknown") as info:
                call()
            assert "NOT_FOUND" in _code(info)
        with pytest.raises(InferenceServerException) as info:  # past max_body_bytes (1 MiB): refused unread
            client.infer(NAME, [_image_input([b"\xff\xd8\xff" + bytes(1_100_000)])])
        assert "RESOURCE_EXHAUSTED" in _code(info)
        assert client.is_server_ready()


def test_grpc_needs_the_api_key_when_the_server_has_one(standin_onnx):
    from attn_export.serve.app import create_app

    settings = make_settings(standin_onnx, api_key="s3cret", grpc_port=0, warmup=False)
    image = make_image((320, 320), [cell_square(2, 0, 0)])
    with GrpcLive(create_app(settings)) as live, grpc_client(live) as client:
        for headers in ({}, {"x-api-key": "wrong"}):
            with pytest.raises(InferenceServerException, match="API key") as info:
                client.infer(NAME, [_image_input([image])], headers=headers)
            assert "UNAUTHENTICATED" in _code(info)
        assert client.is_model_ready(NAME)  # probes stay open, like /readyz
        ok = client.infer(NAME, [_image_input([image])], headers={"x-api-key": "s3cret"})
        assert int(ok.as_numpy("detection_classes")[0, 0]) == 2


def test_grpc_goes_through_the_door(standin_onnx):
    """One request in flight at most: a second one, over gRPC or HTTP, is UNAVAILABLE / 503 with a retry hint."""
    from test_serve_admission import Gate

    from attn_export.serve.app import create_app

    gate = Gate()
    settings = make_settings(standin_onnx, max_in_flight=1, max_batch=1, warmup=False, grpc_port=0)
    image = make_image((320, 320), [cell_square(0, 3, 3)])
    app = create_app(settings, loader=gate.loader)
    with GrpcLive(app) as live, grpc_client(live) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        door = app.state.service.door
        try:
            first = pool.submit(client.infer, NAME, [_image_input([image])], client_timeout=30)
            assert gate.entered.wait(20)
            with pytest.raises(InferenceServerException, match="busy") as info:
                client.infer(NAME, [_image_input([image])], client_timeout=30)
            assert "UNAVAILABLE" in _code(info) and "retry after" in info.value.message()
            r = httpx.post(f"{live.url}/detect", files={"images": ("a.png", image)}, timeout=30)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1  # the same door
            assert door.requests == 1
        finally:
            gate.open.set()
        assert int(first.result(30).as_numpy("num_detections")[0, 0]) == 1
        assert door.requests == 0 and door.bytes == 0 and door.pixels == 0
        assert int(client.infer(NAME, [_image_input([image])]).as_numpy("num_detections")[0, 0]) == 1


def test_grpc_request_in_flight_finishes_on_shutdown_and_a_taken_port_fails_the_start(standin_onnx):
    import threading

    from test_serve_admission import Gate

    from attn_export.serve.app import create_app

    gate = Gate()
    settings = make_settings(standin_onnx, max_batch=1, warmup=False, grpc_port=0, graceful_timeout_s=10)
    image = make_image((320, 320), [cell_square(2, 4, 4)])
    app = create_app(settings, loader=gate.loader)
    live = GrpcLive(app).__enter__()
    try:
        with grpc_client(live) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.infer, NAME, [_image_input([image])], client_timeout=30)
            assert gate.entered.wait(20)
            live.server.should_exit = True  # shutdown begins with the request in flight
            threading.Timer(0.5, gate.open.set).start()
            assert int(first.result(30).as_numpy("detection_classes")[0, 0]) == 2
    finally:
        gate.open.set()
        live.__exit__(None, None, None)
    assert not live.thread.is_alive()
    port = app.state.service.grpc_port
    with socket.socket() as taken:  # a port another process holds: the app does not start
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        clash = make_settings(standin_onnx, warmup=False, grpc_port=taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="is the port taken"), client_for(clash):
            pass
    assert port is not None
