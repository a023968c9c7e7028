"""Triton: repositories whose configs parse into Triton's ModelConfig and match the graph; the real
tritonserver serving the Python-backend repository, queried with tritonclient; our /v2 answering the
unchanged tritonclient; and the same detections from Triton, from our /v2 and from /detect.

The shipped detector is exported once per session (no verification: the export tests cover that).
The tests that need tritonserver skip where neither it nor the nvidia-pytriton wheel is installed
(``make`` installs the wheel).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import LiveServer, free_port, make_settings

tritonclient_http = pytest.importorskip("tritonclient.http")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from attn_export.detection import contract  # noqa: E402
from attn_export.triton_server.repository import RepositoryError, write_repository  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "models" / "shapes_detector.pt"
MAX_BATCH = 8
NAME = "shapes_detector"


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def detector_onnx(tmp_path_factory) -> Path:
    """The shipped detector exported with a dynamic batch; its metadata holds the classes and batch profile."""
    from attn_export.export import export_onnx, load_model

    loaded = load_model(CHECKPOINT)
    path = tmp_path_factory.mktemp("detector") / f"{NAME}.onnx"
    meta = {"classes": loaded.meta.get("classes"), "batch": {"min": 1, "opt": 4, "max": MAX_BATCH}}
    result = export_onnx(loaded.model, path, loaded.input_shape, batch=(1, 4, MAX_BATCH), verify=False, metadata=meta)
    assert result.ok
    return path


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Six fresh shapes scenes (a seed no test or training run uses), as PNG and JPEG, of several sizes."""
    from attn_export.shapes.data import generate

    out = []
    for i, size in enumerate([(320, 320), (480, 360), (256, 400), (640, 480), (300, 300), (333, 517)]):
        arr, _ = generate(90210, i, size=size)
        out.append(_encode(arr, "PNG" if i % 2 else "JPEG"))
    return out


@pytest.fixture(scope="module")
def python_repo(detector_onnx, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_repository(detector_onnx, repo, max_batch=MAX_BATCH, threads=1)
    return repo


@pytest.fixture(scope="module")
def triton(python_repo, tmp_path_factory):
    """The real tritonserver on the Python-backend repository (loopback, free ports, always ended)."""
    from attn_export.triton_server.launcher import TritonNotFound, TritonServer, find_tritonserver

    try:
        install = find_tritonserver()
    except TritonNotFound as e:
        pytest.skip(str(e))
    for path in install.cleanup:
        shutil.rmtree(path, ignore_errors=True)
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(python_repo, free_port(), free_port(), free_port(), log_path=log, exit_timeout=2)
    try:
        server.start().wait_ready(90)
        yield server
    finally:
        server.stop(timeout=10)


@pytest.fixture(scope="module")
def ours(detector_onnx):
    """attn-export serve on the same graph (/detect and /v2)."""
    from attn_export.serve.app import create_app

    settings = make_settings(detector_onnx, max_batch=4, max_wait_ms=5.0, max_det=100)
    with LiveServer(create_app(settings)) as server:
        yield server


@contextlib.contextmanager
def http_client(url: str):
    client = tritonclient_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    try:
        yield client
    finally:
        client.close()


def _image_input(data: list[bytes], binary: bool = True):
    tensor = tritonclient_http.InferInput("image", [len(data), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=object).reshape(-1, 1), binary_data=binary)
    return tensor


def _detect(server, data: bytes, **params) -> list[tuple[list[float], float, int]]:
    r = httpx.post(f"{server.url}/detect", files={"images": ("a", data)}, params=params, timeout=60)
    assert r.status_code == 200, r.text
    return [(d["box"], d["score"], d["class_id"]) for d in r.json()["images"][0]["detections"]]


def _rows(outputs: dict[str, np.ndarray]) -> list[list[tuple[list[float], float, int]]]:
    return [
        [(list(map(float, b)), float(s), int(c)) for b, s, c in zip(boxes, scores, cls, strict=True)]
        for boxes, scores, cls in contract.unpack(outputs)
    ]


def _result_outputs(result) -> dict[str, np.ndarray]:
    return {name: result.as_numpy(name) for name in contract.OUTPUTS}


def assert_same_detections(got, want) -> None:
    """Triton's float32 answer against /detect's JSON (boxes rounded to 0.01 px, scores to 1e-5)."""
    assert len(got) == len(want)
    for (gb, gs, gc), (wb, ws, wc) in zip(got, want, strict=True):
        assert gc == wc
        assert gs == pytest.approx(ws, abs=1e-5)
        assert gb == pytest.approx(wb, abs=0.006)


# ------------------------------------------------------------------------------------------ configs
def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _dims(config_io) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config_io}


def _graph(path: Path):
    """The graph's input and output (names, dims without the batch), read with onnx directly."""
    import onnx

    g = onnx.load(str(path)).graph
    init = {i.name for i in g.initializer}
    (inp,) = [i for i in g.input if i.name not in init]

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

    return (inp.name, dims(inp)), (g.output[0].name, dims(g.output[0]))


CONTRACT_OUT = {
    "num_detections": ("TYPE_INT32", [1]),
    "detection_boxes": ("TYPE_FP32", [100, 4]),
    "detection_scores": ("TYPE_FP32", [100]),
    "detection_classes": ("TYPE_INT32", [100]),
}


def test_python_repository_config_matches_the_graph(python_repo, detector_onnx):
    config = _parse(python_repo / NAME / "config.pbtxt")
    assert config.name == NAME and config.backend == "python"
    assert config.max_batch_size == MAX_BATCH  # the export's batch profile maximum
    assert _dims(config.input) == {"image": ("TYPE_STRING", [1])}
    assert _dims(config.output) == CONTRACT_OUT
    assert config.HasField("dynamic_batching")
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (1, "KIND_CPU")
    ]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert json.loads(params["class_names"]) == ["circle", "triangle", "rectangle", "star"]
    assert (float(params["conf"]), float(params["iou"]), int(params["max_det"])) == (0.25, 0.45, 100)
    (_, in_dims), (_, out_dims) = _graph(detector_onnx)
    assert int(params["input_size"]) == in_dims[2] == in_dims[3]
    assert len(json.loads(params["class_names"])) == out_dims[2] - 4
    version = python_repo / NAME / "1"
    assert sorted(p.name for p in version.iterdir() if p.is_file()) == ["model.onnx", "model.py"]
    assert (version / "model.onnx").read_bytes() == detector_onnx.read_bytes()
    compile((version / "model.py").read_text(), "model.py", "exec")


def test_ensemble_repository_configs_match_the_graph(detector_onnx, tmp_path):
    repo = write_repository(detector_onnx, tmp_path, backend="onnxruntime", max_batch=4, instances=2).path
    configs = {p.parent.name: _parse(p) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {NAME, f"{NAME}_preprocess", f"{NAME}_network", f"{NAME}_postprocess"}
    (in_name, in_dims), (out_name, out_dims) = _graph(detector_onnx)
    net = configs[f"{NAME}_network"]
    assert net.platform == "onnxruntime_onnx" and net.max_batch_size == 4
    assert _dims(net.input) == {in_name: ("TYPE_FP32", in_dims[1:])}
    assert _dims(net.output) == {out_name: ("TYPE_FP32", out_dims[1:])}
    assert [g.count for g in net.instance_group] == [2]
    assert (repo / f"{NAME}_network" / "1" / "model.onnx").is_file()
    ens = configs[NAME]
    assert ens.platform == "ensemble" and ens.max_batch_size == 4
    assert _dims(ens.input) == {"image": ("TYPE_STRING", [1])} and _dims(ens.output) == CONTRACT_OUT
    # every step names a model of the repository, and maps tensors that model declares
    produced = {"image"}
    for step in ens.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) == {t.name for t in model.input}
        assert set(step.input_map.values()) <= produced
        assert set(step.output_map) <= {t.name for t in model.output}
        produced |= set(step.output_map.values())
    assert set(CONTRACT_OUT) <= produced
    assert _dims(configs[f"{NAME}_preprocess"].output)[in_name] == ("TYPE_FP32", in_dims[1:])
    assert _dims(configs[f"{NAME}_postprocess"].output) == CONTRACT_OUT


def _fake_engine(folder: Path, detector_onnx: Path, max_batch: int, mode: str = "aot") -> Path:
    (in_name, in_dims), (out_name, out_dims) = _graph(detector_onnx)
    engine = folder / "det.engine"
    engine.write_bytes(b"not a real engine: the repository writer only copies it")
    meta = {
        "inputs": [{"name": in_name, "shape": ["batch", *in_dims[1:]], "dtype": "float32"}],
        "outputs": [{"name": out_name, "shape": ["batch", *out_dims[1:]], "dtype": "float32"}],
        "batch": {"min": 1, "opt": 2, "max": max_batch},
        "plugins": {"mode": mode, "nodes": {}},
        "classes": ["a", "b", "c", "d"],
    }
    engine.with_name("det.engine.json").write_text(json.dumps(meta))
    return engine


def test_tensorrt_repository_takes_the_engine_profile(detector_onnx, tmp_path):
    engine = _fake_engine(tmp_path, detector_onnx, max_batch=6)
    plugin = tmp_path / "libplugins.so"
    plugin.write_bytes(b"\x7fELF")
    repo = write_repository(engine, tmp_path / "repo", backend="tensorrt", plugin_libs=[plugin])
    assert repo.max_batch == 6  # the engine's profile maximum
    net = _parse(repo.path / "det_network" / "config.pbtxt")
    assert net.platform == "tensorrt_plan" and net.max_batch_size == 6
    assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in net.instance_group] == ["KIND_GPU"]
    assert (repo.path / "det_network" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert (repo.path / "plugins" / "libplugins.so").is_file()
    from attn_export.triton_server.launcher import repository_args

    assert repository_args(repo.path) == [
        f"--backend-config=tensorrt,plugins={(repo.path / 'plugins' / 'libplugins.so').resolve()}"
    ]
    params = {k: v.string_value for k, v in _parse(repo.path / "det" / "config.pbtxt").parameters.items()}
    assert json.loads(params["class_names"]) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("above the profile", "above the model's batch profile"),
        ("jit engine", "JIT-plugin engine"),
        ("onnx on tensorrt", "runs a built TensorRT engine"),
        ("existing model", "--force"),
        ("missing file", "no such file"),
    ],
)
def test_repository_errors_write_nothing(detector_onnx, tmp_path, case, words):
    repo = tmp_path / "repo"
    model, kwargs = detector_onnx, {}
    if case == "above the profile":
        model, kwargs = _fake_engine(tmp_path, detector_onnx, max_batch=4), {"backend": "tensorrt", "max_batch": 8}
    elif case == "jit engine":
        model, kwargs = _fake_engine(tmp_path, detector_onnx, max_batch=4, mode="jit"), {"backend": "tensorrt"}
    elif case == "onnx on tensorrt":
        kwargs = {"backend": "tensorrt"}
    elif case == "existing model":
        write_repository(detector_onnx, repo)
    elif case == "missing file":
        model = tmp_path / "nope.onnx"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(RepositoryError, match=words):
        write_repository(model, repo, **kwargs)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_pbtxt_writer_escapes_and_round_trips():
    config = contract.model_config(
        'odd "name"\\x', max_batch=3, class_names=['say "hi"', "back\\slash", "é"], input_size=64,
        defaults=contract.Params(0.5, 0.6, 7),
    )  # fmt: skip
    parsed = text_format.Parse(contract.to_pbtxt(config), model_config_pb2.ModelConfig())
    assert parsed.name == 'odd "name"\\x'
    assert json.loads(parsed.parameters["class_names"].string_value) == ['say "hi"', "back\\slash", "é"]
    assert _dims(parsed.output)["detection_boxes"] == ("TYPE_FP32", [7, 4])
    from google.protobuf import json_format

    assert json_format.MessageToDict(parsed)["maxBatchSize"] == 3


# ------------------------------------------------------------------------------------------ the real Triton
def test_triton_answers_like_detect(triton, ours, images):
    """One batched request of six images to tritonserver; each image alone to /detect: the same detections."""
    with http_client(triton.url) as client:
        assert client.is_server_ready() and client.is_model_ready(NAME)
        config = client.get_model_config(NAME)
        assert config["max_batch_size"] == MAX_BATCH and config["backend"] == "python"
        result = client.infer(NAME, [_image_input(images)])
    got = _rows(_result_outputs(result))
    assert result.as_numpy("detection_boxes").shape == (len(images), 100, 4)
    total = 0
    for rows, data in zip(got, images, strict=True):
        want = _detect(ours, data)
        assert_same_detections(rows, want)
        total += len(want)
    assert total >= len(images)  # the scenes hold shapes, and both servers find them


def test_triton_request_parameters_and_grpc(triton, ours, images):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.grpc_port}")
    try:
        config = client.get_model_config(NAME, as_json=True)["config"]
        assert int(config["max_batch_size"]) == MAX_BATCH
        tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[images[3]]], dtype=object))
        result = client.infer(NAME, [tensor], parameters={"conf": "0.5", "max_det": 2})
    finally:
        client.close()
    got = _rows({n: result.as_numpy(n) for n in contract.OUTPUTS})[0]
    want = _detect(ours, images[3], conf=0.5, max_det=2)
    assert len(want) >= 1
    assert_same_detections(got, want)


def test_triton_bad_image_gets_an_error_and_the_server_goes_on(triton, images):
    with http_client(triton.url) as client:
        with pytest.raises(Exception, match="not an image") as info:
            client.infer(NAME, [_image_input([b"these are not the pixels you are looking for"])])
        assert "400" in str(info.value.status())
        with pytest.raises(Exception, match="max_det"):
            client.infer(NAME, [_image_input(images[:1])], parameters={"max_det": 500})
        ok = client.infer(NAME, [_image_input(images[:1])])
        assert int(ok.as_numpy("num_detections")[0, 0]) >= 1


def test_one_json_request_works_on_both_servers(triton, ours, images):
    """JSON tensors (the image in base64, JSON outputs): the same body to Triton and to our /v2."""
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                    "data": [base64.b64encode(images[0]).decode(), base64.b64encode(images[1]).decode()]}],
        "parameters": {"conf": 0.4},
    }  # fmt: skip
    answers = []
    for server in (triton, ours):
        r = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
        answers.append(_rows(out))
    assert len(answers[0]) == 2
    for a, b in zip(*answers, strict=True):
        assert [c for *_, c in a] == [c for *_, c in b]
        assert np.allclose([x[0] for x in a], [x[0] for x in b], atol=1e-3) if a else not b
        assert np.allclose([x[1] for x in a], [x[1] for x in b], atol=1e-6) if a else not b


# ------------------------------------------------------------------------------------------ our /v2
def test_tritonclient_unchanged_against_our_v2(ours, images):
    with http_client(ours.url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(NAME) and not client.is_model_ready("other")
        meta = client.get_server_metadata()
        assert "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata(NAME)
        assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
        assert [o["name"] for o in model["outputs"]] == list(contract.OUTPUTS)
        config = client.get_model_config(NAME)
        parsed = json.loads(json.dumps(config))
        from google.protobuf import json_format

        message = json_format.ParseDict(parsed, model_config_pb2.ModelConfig(), ignore_unknown_fields=False)
        assert _dims(message.output) == CONTRACT_OUT and message.max_batch_size == 16
        assert json.loads(message.parameters["class_names"].string_value)[0] == "circle"
        assert client.get_model_repository_index()[0]["name"] == NAME
        binary = client.infer(NAME, [_image_input(images[:3])])
        outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=False) for n in contract.OUTPUTS]
        as_json = client.infer(
            NAME, [_image_input(images[:3])], outputs=outputs, request_compression_algorithm="gzip",
            response_compression_algorithm="deflate",
        )  # fmt: skip
        packed = client.infer(NAME, [_image_input(images[:3])], response_compression_algorithm="gzip")
    got = _rows(_result_outputs(binary))
    assert _rows(_result_outputs(as_json)) == got
    assert _rows(_result_outputs(packed)) == got
    for rows, data in zip(got, images[:3], strict=True):
        assert_same_detections(rows, _detect(ours, data))


def _v2_error(server, body: bytes | dict, headers: dict | None = None, model: str = NAME) -> tuple[int, str]:
    url = f"{server.url}/v2/models/{model}/infer"
    if isinstance(body, dict):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
    else:
        r = httpx.post(url, content=body, headers=headers, timeout=30)
    assert set(r.json()) == {"error"}, r.text
    return r.status_code, r.json()["error"]


def _req(data=None, **tensor):
    base = {"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": data if data is not None else ["x"]}
    return {"inputs": [base | tensor]}


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("unknown model", 404, "unknown model"),
        ("not json", 400, "not JSON"),
        ("no inputs", 400, "'inputs'"),
        ("wrong input name", 400, "unexpected inference input"),
        ("wrong datatype", 400, "BYTES"),
        ("wrong shape", 400, "shape"),
        ("shape and data disagree", 400, "elements, 'data' holds"),
        ("batch too large", 400, "max_batch_size"),
        ("text, not an image", 415, "not an image"),
        ("conf out of range", 400, "conf"),
        ("unknown output", 400, "unexpected inference output"),
        ("binary size past the body", 400, "binary_data_size"),
        ("bad header length", 400, "Inference-Header-Content-Length"),
        ("bad gzip", 400, "decompress"),
    ],
)
def test_v2_errors_in_the_protocols_form(ours, case, status, words):
    headers = None
    model = NAME
    body: bytes | dict
    if case == "unknown model":
        body, model = _req(), "yolo"
    elif case == "not json":
        body = b"{not json"
    elif case == "no inputs":
        body = {"outputs": []}
    elif case == "wrong input name":
        body = _req(name="images")
    elif case == "wrong datatype":
        body = _req(datatype="UINT8")
    elif case == "wrong shape":
        body = _req(shape=[1])
    elif case == "shape and data disagree":
        body = _req(data=["a", "b"])
    elif case == "batch too large":
        body = _req(data=["a"] * 17, shape=[17, 1])
    elif case == "text, not an image":
        body = _req(data=["hello, this is text"])
    elif case == "conf out of range":
        body = _req() | {"parameters": {"conf": 2}}
    elif case == "unknown output":
        body = _req() | {"outputs": [{"name": "boxes"}]}
    elif case == "binary size past the body":
        head = json.dumps(_req(parameters={"binary_data_size": 999})).encode()
        body, headers = head + b"\0\0\0\0", {"Inference-Header-Content-Length": str(len(head))}
    elif case == "bad header length":
        body, headers = json.dumps(_req()).encode(), {"Inference-Header-Content-Length": "99999"}
    else:
        body, headers = b"\x1f\x8bnot gzip at all", {"Content-Encoding": "gzip"}
    got_status, message = _v2_error(ours, body, headers, model)
    assert got_status == status and words in message, message


def test_v2_health_and_binary_round_trip(ours, images):
    assert httpx.get(f"{ours.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{ours.url}/v2/health/ready").status_code == 200
    # a hand-made binary request (length-prefixed BYTES), gzip-compressed, binary outputs
    raw = b"".join(len(d).to_bytes(4, "little") + d for d in images[:2])
    head = json.dumps(
        {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                                 "parameters": {"binary_data_size": len(raw)}}],
         "outputs": [{"name": "num_detections", "parameters": {"binary_data": True}},
                     {"name": "detection_classes", "parameters": {"binary_data": False}}]}
    ).encode()  # fmt: skip
    r = httpx.post(
        f"{ours.url}/v2/models/{NAME}/versions/1/infer",
        content=gzip.compress(head + raw),
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Encoding": "gzip"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    answer = json.loads(r.content[:n])
    assert answer["id"] == "r1" and answer["model_version"] == "1"
    num, cls = answer["outputs"]
    assert num["parameters"]["binary_data_size"] == 8 and len(r.content) == n + 8
    counts = np.frombuffer(r.content[n:], "<i4")
    assert counts.tolist() == [len(_detect(ours, d)) for d in images[:2]]
    assert np.array(cls["data"]).reshape(cls["shape"]).shape == (2, 100)
    # response compression, as tritonclient asks for it
    body = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [base64.b64encode(images[0]).decode()]}
        ]
    }
    plain = httpx.post(
        f"{ours.url}/v2/models/{NAME}/infer", json=body, headers={"Accept-Encoding": "identity"}, timeout=60
    )
    packed = httpx.post(
        f"{ours.url}/v2/models/{NAME}/infer", json=body, headers={"Accept-Encoding": "gzip"}, timeout=60
    )
    assert "content-encoding" not in plain.headers and packed.headers["content-encoding"] == "gzip"
    assert packed.json() == plain.json()  # httpx decompresses


# ------------------------------------------------------------------------------------------ CLI
def test_cli_writes_a_repository_and_refuses_bad_input(detector_onnx, tmp_path, capsys):
    from attn_export.cli import main

    assert main(["triton", str(detector_onnx), "--repo", str(tmp_path / "r"), "--max-batch", "4", "-q"]) == 0
    assert _parse(tmp_path / "r" / NAME / "config.pbtxt").max_batch_size == 4
    assert main(["triton", str(tmp_path / "missing.onnx"), "--repo", str(tmp_path / "r2")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() or not any((tmp_path / "r2").iterdir())


def test_triton_serve_without_a_server_says_how_to_install(tmp_path, monkeypatch, capsys):
    from attn_export.cli import main
    from attn_export.triton_server import launcher as triton_server

    monkeypatch.setattr(triton_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(triton_server, "_pytriton_root", lambda: None)
    assert main(["triton", "serve", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "pip install 'attn-export[triton-server]'" in err and "nvcr.io/nvidia/tritonserver" in err


# ------------------------------------------------------------------------------------------ ensemble steps
class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _FakeRequest:
    def __init__(self, tensors: list[_FakeTensor], parameters: dict | None = None) -> None:
        self.tensors = {t.name(): t for t in tensors}
        self._parameters = json.dumps(parameters or {})

    def parameters(self) -> str:
        return self._parameters


class _FakeResponse:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class _FakeError(Exception):
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message: str, code=None) -> None:
        super().__init__(message)
        self.code = code


def _fake_pb():
    import types

    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = _FakeTensor
    pb.InferenceResponse = _FakeResponse
    pb.TritonError = _FakeError
    pb.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    return pb


def _load(model_cls, folder: Path):
    """A Python-backend model initialised as tritonserver does: its config as JSON with proto field names."""
    from google.protobuf import json_format

    config = json_format.MessageToDict(_parse(folder / "config.pbtxt"), preserving_proto_field_name=True)
    model = model_cls()
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": str(folder), "model_version": "1",
         "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    )  # fmt: skip
    return model


def test_ensemble_steps_answer_like_the_python_model(detector_onnx, python_repo, tmp_path, images, monkeypatch):
    """Preprocess -> the network -> Postprocess (the onnxruntime/tensorrt ensembles' Python steps, which the
    wheel's tritonserver cannot chain to a native backend here) give the Python model's answer, in-process."""
    from attn_export.runtime.runners import OnnxRuntimeRunner
    from attn_export.triton_server.model import LETTERBOX, Detector, Postprocess, Preprocess

    monkeypatch.setitem(__import__("sys").modules, "triton_python_backend_utils", _fake_pb())
    repo = write_repository(detector_onnx, tmp_path, backend="onnxruntime", max_batch=4).path
    detector = _load(Detector, python_repo / NAME)
    pre, post = _load(Preprocess, repo / f"{NAME}_preprocess"), _load(Postprocess, repo / f"{NAME}_postprocess")
    network = OnnxRuntimeRunner(repo / f"{NAME}_network" / "1" / "model.onnx", threads=1)
    (in_name, _), (out_name, _) = _graph(detector_onnx)
    requests = [
        _FakeRequest([_FakeTensor("image", np.array([[images[0]], [images[1]]], dtype=object))], {"conf": 0.3}),
        _FakeRequest([_FakeTensor("image", np.array([[b"GIF89a not supported"]], dtype=object))]),
        _FakeRequest([_FakeTensor("image", np.array([[images[4]]], dtype=object))]),
    ]
    want = detector.execute(requests)
    assert want[1].error is not None and "GIF" in str(want[1].error) and want[1].error.code == "INVALID_ARG"
    staged = pre.execute(requests)
    assert staged[1].error is not None
    for i in (0, 2):
        assert want[i].error is None and staged[i].error is None
        feeds = staged[i].outputs
        preds = network.infer({in_name: feeds[in_name]})[out_name]
        step = _FakeRequest(
            [_FakeTensor(out_name, preds), _FakeTensor(LETTERBOX, feeds[LETTERBOX])],
            json.loads(requests[i].parameters()),
        )
        (got,) = post.execute([step])
        assert set(got.outputs) == set(contract.OUTPUTS)
        for name in contract.OUTPUTS:
            np.testing.assert_allclose(got.outputs[name], want[i].outputs[name], atol=1e-4)
    assert int(want[0].outputs["num_detections"].sum()) >= 1


# ------------------------------------------------------------------------------------------ deployment files
def test_triton_dockerfile_lints_and_compose_profile_mounts_the_repository():
    import subprocess
    import sys

    dockerfile = ROOT / "docker" / "Dockerfile.triton"
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if Path(exe).exists():
        result = subprocess.run(
            [exe, "--no-color", "--failure-threshold", "info", str(dockerfile)], capture_output=True
        )
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["triton"]
    assert service["profiles"] == ["triton"] and service["build"]["dockerfile"] == "docker/Dockerfile.triton"
    assert any(v.endswith(":/models:ro") for v in service["volumes"])
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert '"--model-repository=/models"' in dockerfile.read_text()


def test_v2_infer_needs_the_api_key_when_the_server_has_one(standin_onnx):
    from serve_helpers import cell_square, client_for, make_image

    with client_for(make_settings(standin_onnx, api_key="s3cret")) as client:
        image = make_image((320, 320), [cell_square(1, 2, 3)])
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                            "data": [base64.b64encode(image).decode()]}]}  # fmt: skip
        for headers, status in (({}, 401), ({"X-API-Key": "wrong"}, 401)):
            r = client.post("/v2/models/standin/infer", json=body, headers=headers)
            assert r.status_code == status and "API key" in r.json()["error"]
        # refused at the door, before a place is taken or the body read, and counted like /detect's
        metrics = client.get("/metrics").text
        assert 'attn_export_rejected_inputs_total{reason="api_key"} 2.0' in metrics
        assert client.get("/v2/models/standin").status_code == 200  # metadata stays open, like /readyz
        r = client.post("/v2/models/standin/infer", json=body, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["num_detections"]["data"] == [1] and out["detection_classes"]["data"][0] == 1
        assert out["detection_boxes"]["data"][:4] == [96.0, 64.0, 128.0, 96.0]
        assert client.get("/v2/models/standin/versions/2").status_code == 404


def test_v2_infer_parses_and_answers_off_the_event_loop(standin_onnx, monkeypatch):
    """gunzip, JSON, base64 and the response body of up to max_body_bytes run on the CPU pool, never on
    the event loop (where they would stall /healthz and /readyz)."""
    from serve_helpers import cell_square, client_for, make_image

    from attn_export.serve import v2_http as oip

    on_loop = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(fn.__name__)
            except RuntimeError:  # no loop in this thread: a worker
                pass
            return fn(*args, **kwargs)

        return wrapped

    for name in ("_decompress", "parse_infer", "infer_response", "compress"):
        monkeypatch.setattr(oip, name, spy(getattr(oip, name)))
    with client_for(make_settings(standin_onnx)) as client:
        image = make_image((320, 320), [cell_square(1, 2, 3)])
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                            "data": [base64.b64encode(image).decode()]}]}  # fmt: skip
        packed = gzip.compress(json.dumps(body).encode())
        r = client.post(
            "/v2/models/standin/infer", content=packed, headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["outputs"]
    assert on_loop == []


def test_wheel_server_with_numpy_2_needs_the_stub_folder(monkeypatch):
    from attn_export.triton_server import launcher as triton_server

    if triton_server._pytriton_root() is None:
        pytest.skip("the nvidia-pytriton wheel is not installed")
    monkeypatch.setattr(triton_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(triton_server, "stub_site", lambda: None)
    monkeypatch.setattr(triton_server, "_numpy_major", lambda: 2)
    with pytest.raises(triton_server.TritonNotFound, match=r"numpy < 2.*pip install --target .*triton-stub"):
        triton_server.find_tritonserver()


def test_triton_serve_refuses_a_repository_of_the_old_module_path(detector_onnx, tmp_path, monkeypatch, capsys):
    """A repository from before the move imports attn_export.serve.triton_model: refused (exit 2) before any
    tritonserver starts, with the sed command that rewrites it, which does."""
    import subprocess

    from attn_export.cli import main
    from attn_export.triton_server import launcher

    repo = tmp_path / "repo"
    write_repository(detector_onnx, repo, max_batch=MAX_BATCH)
    model_py = repo / NAME / "1" / "model.py"
    written = model_py.read_text()
    assert "from attn_export.triton_server.model import Detector as TritonPythonModel" in written
    model_py.write_text(written.replace("attn_export.triton_server.model", "attn_export.serve.triton_model"))
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    monkeypatch.setattr(launcher, "_pytriton_root", lambda: None)
    sed = f"sed -i 's/attn_export.serve.triton_model/attn_export.triton_server.model/' {repo}/*/1/model.py"
    for extra in ([], ["--print-command"]):
        assert main(["triton", "serve", str(repo), *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert sed in err and f"attn-export triton MODEL --repo {repo}" in err and NAME in err
    with pytest.raises(launcher.OutdatedRepository):
        launcher.TritonServer(repo).start()
    subprocess.run(sed, shell=True, check=True)
    assert model_py.read_text() == written
    assert main(["triton", "serve", str(repo)]) == 3  # past the check: no tritonserver here
