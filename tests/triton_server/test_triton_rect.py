"""The Triton repository for a graph with free height and width and a YOLO head: configs with ``-1`` for
the free axes and the head and stride for the Python steps; the Python model and the ensemble's steps
answer as a float64 numpy decoding of the graph's raw output on the rect letterbox says (in-process, with
a stand-in for tritonserver's ``triton_python_backend_utils``)."""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from yolo_standins import YoloV5StandIn, YoloV8StandIn, export_free_hw, reference

from attn_export.detection import contract
from attn_export.detection.loader import export_metadata
from attn_export.runtime.runners import OnnxRuntimeRunner
from attn_export.triton_server.model import LETTERBOX, Detector, Postprocess, Preprocess
from attn_export.triton_server.repository import write_repository

json_format = pytest.importorskip("google.protobuf.json_format")
text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


class Tensor:
    def __init__(self, name: str, array) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class Request:
    def __init__(self, tensors, parameters=None) -> None:
        self.tensors = {t.name(): t for t in tensors}
        self._parameters = json.dumps(parameters or {})

    def parameters(self) -> str:
        return self._parameters


class Response:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class TritonError(Exception):
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message, code=None) -> None:
        super().__init__(message)


@pytest.fixture
def pb(monkeypatch):
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor, module.InferenceResponse, module.TritonError = Tensor, Response, TritonError
    module.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def _config(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _load(cls, folder):
    config = json_format.MessageToDict(_config(folder), preserving_proto_field_name=True)
    model = cls()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(folder), "model_version": "1",
                      "model_instance_kind": "CPU", "model_instance_device_id": "0"})  # fmt: skip
    return model


def _png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["v5", "v8"])
def test_rect_yolo_repository_answers_as_numpy_decodes(kind, tmp_path, pb):
    torch.manual_seed(3)
    model = YoloV5StandIn() if kind == "v5" else YoloV8StandIn()
    head = "yolov5" if kind == "v5" else "yolov8"
    graph = export_free_hw(model, tmp_path / f"{kind}.onnx", metadata=export_metadata(model, None, (3, 320, 320)))
    repo = write_repository(graph, tmp_path / "py", backend="python", max_batch=4, max_det=100).path
    ens = write_repository(graph, tmp_path / "ens", backend="onnxruntime", max_batch=4, max_det=100).path
    name = graph.stem
    params = json_format.MessageToDict(_config(repo / name), preserving_proto_field_name=True)["parameters"]
    assert params["head"]["string_value"] == head and params["stride"]["string_value"] == "16"
    net = _config(ens / f"{name}_network")
    assert list(net.input[0].dims) == [3, -1, -1] and net.max_batch_size == 4
    assert len(net.output) == 1 and net.output[0].name == "output"  # the decoded output only
    assert list(_config(ens / f"{name}_preprocess").output[0].dims) == [3, -1, -1]

    images = [_png(640, 360, 1), _png(280, 500, 2), _png(1000, 240, 3)]
    conf = max(reference(graph, data, head, 16)[0] for data in images)  # one threshold, 15 or fewer boxes each
    wants = [reference(graph, data, head, 16, conf=conf) for data in images]
    requests = [
        Request([Tensor("image", np.array([[images[0]], [images[1]]], dtype=object))], {"conf": conf, "iou": 1.0}),
        Request([Tensor("image", np.array([[images[2]]], dtype=object))], {"conf": conf, "iou": 1.0}),
    ]
    answers = _load(Detector, repo / name).execute(requests)
    got = [d for a in answers for d in contract.unpack(a.outputs)]
    for (boxes, scores, cls), (_, wb, ws, wc) in zip(got, wants, strict=True):
        assert len(scores) == len(ws) > 0
        np.testing.assert_allclose(scores, ws, atol=2e-5)
        np.testing.assert_array_equal(cls, wc)
        np.testing.assert_allclose(boxes, wb, atol=0.02)

    # the ensemble's steps: a request's images share one input (padded to the largest); a lone image is exact
    pre, post = _load(Preprocess, ens / f"{name}_preprocess"), _load(Postprocess, ens / f"{name}_postprocess")
    runner = OnnxRuntimeRunner(ens / f"{name}_network" / "1" / "model.onnx", threads=1)
    fed = pre.execute(requests[1:])[0]
    assert fed.error is None and fed.outputs["images"].shape == (1, 3, 80, 320)  # 1000 x 240 -> 320 x 76.8
    raw = runner.infer({"images": fed.outputs["images"]})["output"]
    step = Request([Tensor("output", raw), Tensor(LETTERBOX, fed.outputs[LETTERBOX])], {"conf": conf, "iou": 1.0})
    ((boxes, scores, cls),) = contract.unpack(post.execute([step])[0].outputs)
    _, wb, ws, wc = wants[2]
    np.testing.assert_allclose(scores, ws, atol=2e-5)
    np.testing.assert_array_equal(cls, wc)
    np.testing.assert_allclose(boxes, wb, atol=0.02)


def test_real_tritonserver_answers_for_a_rect_yolov8_repository(tmp_path):
    """The Python-backend repository of a YOLOv8 graph with free height and width, on the real tritonserver
    (skipped where it is not installed): its answers are the numpy decoding's."""
    import shutil

    from serve_helpers import free_port

    from attn_export.triton_server.launcher import TritonNotFound, TritonServer, find_tritonserver

    tritonclient_http = pytest.importorskip("tritonclient.http")
    try:
        install = find_tritonserver()
    except TritonNotFound as e:
        pytest.skip(str(e))
    for path in install.cleanup:
        shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(4)
    model = YoloV8StandIn()
    graph = export_free_hw(model, tmp_path / "yolov8.onnx", metadata=export_metadata(model, None, (3, 320, 320)))
    repo = write_repository(graph, tmp_path / "repo", backend="python", max_batch=4, threads=1).path
    images = [_png(640, 360, 5), _png(250, 600, 6)]
    server = TritonServer(repo, free_port(), free_port(), free_port(), log_path=tmp_path / "triton.log", exit_timeout=2)
    try:
        server.start().wait_ready(90)
        client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
        try:
            for data in images:
                tensor = tritonclient_http.InferInput("image", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([data], dtype=object).reshape(1, 1))
                conf, wb, ws, wc = reference(graph, data, "yolov8", 16)  # about 15 boxes
                res = client.infer("yolov8", [tensor], parameters={"conf": conf, "iou": 1.0})
                ((boxes, scores, cls),) = contract.unpack({n: res.as_numpy(n) for n in contract.OUTPUTS})
                assert len(scores) == len(ws) > 0
                np.testing.assert_allclose(scores, ws, atol=2e-5)
                np.testing.assert_array_equal(cls, wc)
                np.testing.assert_allclose(boxes, wb, atol=0.02)
        finally:
            client.close()
    finally:
        server.stop(timeout=10)
