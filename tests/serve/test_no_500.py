"""Issue 21: no request a client can send gets a 5xx; each defect found by hand has its regression test here.

The corpus of inputs that once broke the service (``tests/serve/corpus/``: the hand-found ones and any a
fuzzer finds later) is replayed against ``/v2`` infer, ``/detect`` and gRPC ``ModelInfer``: each must get
its expected 4xx (or gRPC status) with words of a one-line reason, and the last guard's counter of
unexpected errors (``attn_export_internal_errors_total``) must stay at 0.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, cell_square, client_for, free_port, make_image, make_settings

CORPUS = Path(__file__).parent / "corpus"
NAME = "standin"
INFER = f"/v2/models/{NAME}/infer"


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def internal_errors(metrics_text: str) -> float:
    """Every count of the last guard (any route): what no test may ever reach."""
    found = re.findall(r"^attn_export_internal_errors_total\{.*\} ([0-9.e+-]+)$", metrics_text, re.M)
    return sum(float(v) for v in found)


def _raw_header(value: str) -> bytes:
    """A header value as the bytes on the wire: Latin-1 where it fits (the server decodes it so: '²' is the one
    byte 0xB2), else UTF-8."""
    return value.encode("latin-1") if all(ord(c) < 256 for c in value) else value.encode()


def _image_request(data: bytes | str) -> dict:
    if isinstance(data, bytes):
        data = base64.b64encode(data).decode()
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [data]}]}


def _binary_request(image: bytes) -> tuple[bytes, int]:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(image) + 4}}
    head = json.dumps({"inputs": [tensor]}).encode()
    return head + struct.pack("<I", len(image)) + image, len(head)


@pytest.fixture(scope="module")
def good() -> bytes:
    return make_image((320, 320), [cell_square(2, 4, 6)])


def _detections(r) -> int:
    assert r.status_code == 200, r.text
    (num,) = [o for o in r.json()["outputs"] if o["name"] == "num_detections"]
    return num["data"][0]


# ------------------------------------------------------------------------------------------ item 1: four 500s
def test_lone_surrogate_in_a_bytes_row_is_400(client):
    body = json.dumps(_image_request("\ud800")).encode()  # json.dumps writes it as the escape \ud800
    assert b"\\ud800" in body
    r = client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "UTF-8" in r.json()["error"]


def test_json_nested_50000_deep_is_400(client):
    deep = b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = client.post(INFER, content=deep)
    assert r.status_code == 400, r.text
    assert "nested" in r.json()["error"]


@pytest.mark.parametrize("name", ["conf", "iou", "max_det"])
def test_a_400_digit_parameter_is_400(client, good, name):
    body = _image_request(good) | {"parameters": {name: 10**400}}
    r = client.post(INFER, content=json.dumps(body).encode())  # a 401-digit integer literal
    assert r.status_code == 400, r.text
    assert name in r.json()["error"]


@pytest.mark.parametrize("value", ["²", "1²", "٣", "+5", "-1", "9" * 400, ""])
def test_inference_header_content_length_takes_ascii_digits_only(live_server, good, value):
    """On a real server: the TestClient sends a header's bytes re-encoded (0xB2 arrives as 'Â²')."""
    body, _ = _binary_request(good)
    headers = {"Inference-Header-Content-Length": _raw_header(value)}
    r = httpx.post(f"{live_server.url}{INFER}", content=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert "Inference-Header-Content-Length" in r.json()["error"]


def test_inference_header_content_length_still_works(client, good):
    body, n = _binary_request(good)
    assert _detections(client.post(INFER, content=body, headers={"Inference-Header-Content-Length": str(n)})) == 1


# ------------------------------------------------------------------------------------------ item 4: minor
@pytest.mark.parametrize("coding", ["GZIP", "Gzip", "x-gzip", " gzip ", "DEFLATE"])
def test_content_codings_are_case_insensitive(client, good, coding):
    raw = json.dumps(_image_request(good)).encode()
    packed = zlib.compress(raw) if coding.strip().lower() == "deflate" else gzip.compress(raw)
    assert _detections(client.post(INFER, content=packed, headers={"Content-Encoding": coding})) == 1


def test_data_after_the_gzip_member_is_not_ignored(client, good):
    raw = json.dumps(_image_request(good)).encode()
    # a second gzip member is decoded (RFC 1952: a gzip file is a series of members), like gunzip does
    half = len(raw) // 2
    r = client.post(INFER, content=gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
                    headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert _detections(r) == 1
    # anything else after the member is refused, not dropped
    for tail, words in ((b"trailing garbage", "after"), (b"\x1f\x8b\x08\x00", "truncated")):
        r = client.post(INFER, content=gzip.compress(raw) + tail, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and words in r.json()["error"], (tail, r.text)
    r = client.post(INFER, content=zlib.compress(raw) + b"x", headers={"Content-Encoding": "deflate"})
    assert r.status_code == 400 and "after" in r.json()["error"], r.text
    # a body cut inside its one member: refused too (it used to decode to a prefix of the JSON)
    r = client.post(INFER, content=gzip.compress(raw)[:-20], headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and "truncated" in r.json()["error"], r.text


def test_two_codings_and_unknown_codings_are_415(client, good):
    raw = gzip.compress(json.dumps(_image_request(good)).encode())
    for coding in ("br", "gzip, gzip", "compress"):
        r = client.post(INFER, content=raw, headers={"Content-Encoding": coding})
        assert r.status_code == 415 and "Content-Encoding" in r.json()["error"], (coding, r.text)
    assert _detections(client.post(INFER, content=raw, headers={"Content-Encoding": "identity, gzip"})) == 1


def test_readyz_without_the_key_shows_no_absolute_path(standin_onnx):
    with client_for(make_settings(standin_onnx, warmup=False)) as c:  # no key configured: nobody is trusted
        body = c.get("/readyz").json()
        assert body["path"] == standin_onnx.name and str(standin_onnx.parent) not in json.dumps(body)
    with client_for(make_settings(standin_onnx, warmup=False, api_key="s3cret")) as c:
        assert c.get("/readyz").json()["path"] == standin_onnx.name
        assert c.get("/readyz", headers={"X-API-Key": "wrong"}).json()["path"] == standin_onnx.name
        assert c.get("/readyz", headers={"X-API-Key": "s3cret"}).json()["path"] == str(standin_onnx)


def test_v2_traffic_is_counted_by_route_template(client, good):
    before = client.get("/metrics").text
    assert _detections(client.post(INFER, json=_image_request(good))) == 1
    assert client.post(INFER, content=b"{").status_code == 400
    assert client.get(f"/v2/models/{NAME}/versions/1/ready").status_code == 200
    assert client.get("/v2/models/nope").status_code == 404
    assert client.post(INFER, content=bytes(3 * 1024 * 1024)).status_code == 413  # by the door, before routing
    after = client.get("/metrics").text
    key = "attn_export_http_requests_total"

    def grew(labels: str) -> float:
        return _metric(after, key, labels) - _metric(before, key, labels)

    assert grew('{method="POST",route="/v2/models/{model}/infer",status="200"}') == 1
    assert grew('{method="POST",route="/v2/models/{model}/infer",status="400"}') == 1
    assert grew('{method="GET",route="/v2/models/{model}/versions/{version}/ready",status="200"}') == 1
    assert grew('{method="GET",route="/v2/models/{model}",status="404"}') == 1
    assert grew('{method="POST",route="/v2/models/{model}/infer",status="413"}') == 1
    assert grew('{method="POST",route="other",status="200"}') == 0
    assert grew('{method="POST",route="other",status="400"}') == 0


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    try:
        import swagger_ui_bundle  # noqa: F401
    except ImportError:  # the page says why it may show nothing
        assert "offline" in page.text
        return
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
    assert len(assets) >= 2
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 1000, asset
    assert "swagger" in client.get(next(a for a in assets if a.endswith("bundle.js"))).text[:5000].lower()


def test_the_last_guard_is_a_logged_500_counted_by_route(standin_onnx, good, caplog):
    """What no client input should reach: a bug. It answers 500 in each protocol's form, is logged with its
    traceback and counted by route template."""
    from attn_export.serve import v2_http

    with client_for(make_settings(standin_onnx, warmup=False)) as c:
        original = v2_http.parse_infer
        v2_http.parse_infer = lambda *a: 1 / 0
        try:
            r = c.post(INFER, json=_image_request(good))
        finally:
            v2_http.parse_infer = original
        assert r.status_code == 500 and r.json() == {"error": "internal error: ZeroDivisionError"}
        text = c.get("/metrics").text
        assert _metric(text, "attn_export_internal_errors_total", '{route="/v2/models/{model}/infer"}') == 1
        assert internal_errors(text) == 1
        assert "ZeroDivisionError" in caplog.text


def test_api_key_check_takes_any_text():
    """Found by test_fuzz_parsers: a lone surrogate as the key raised UnicodeEncodeError (not reachable over
    HTTP, whose headers decode as Latin-1, nor gRPC's ASCII metadata; the check must still not raise)."""
    from pydantic import SecretStr

    from attn_export.serve.auth import key_refused

    for given in ("\ud800", "s3cr\udc80t", "é", "s3cret\x00"):
        assert key_refused(SecretStr("s3cret"), given).startswith("wrong API key")
    assert key_refused(SecretStr("s3cret"), "s3cret") is None


# ------------------------------------------------------------------------------------------ gRPC
@pytest.fixture(scope="module")
def grpc_server(standin_onnx):
    pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc")
    from attn_export.serve.app import create_app

    settings = make_settings(standin_onnx, warmup=False, max_body_bytes=1024 * 1024, grpc_port=free_port())
    app = create_app(settings)
    with LiveServer(app) as live:
        live.app = app
        yield live


def _raw_call(port: int, method: str, payload: bytes, timeout: float = 30):
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out
        return call(payload, timeout=timeout)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11],
                         ids=["bad tag", "short field", "varint overflow"])  # fmt: skip
def test_unparsable_protobuf_is_invalid_argument(grpc_server, payload):
    import grpc

    port = grpc_server.app.state.service.grpc_port
    for method in ("ModelInfer", "ModelMetadata"):
        with pytest.raises(grpc.RpcError) as info:
            _raw_call(port, method, payload)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
        assert "protobuf" in info.value.details()
    from tritonclient.grpc import service_pb2 as pb

    answer = pb.ServerLiveResponse.FromString(_raw_call(port, "ServerLive", b""))
    assert answer.live


# ------------------------------------------------------------------------------------------ the corpus
def _corpus(kind: str) -> list[dict]:
    cases = []
    for path in sorted((CORPUS / kind).glob("*.json")):
        case = json.loads(path.read_text(encoding="utf-8"))
        case["id"] = path.stem
        cases.append(case)
    return cases


def corpus_body(case: dict) -> bytes:
    """A corpus case's body: ``text`` (UTF-8, may hold lone surrogates as JSON escapes), ``b64``, or ``gz_b64``
    (gzip-compressed, for large regular bodies; sent as they decompress, unless the case has
    Content-Encoding itself)."""
    if "text" in case:
        return case["text"].encode("utf-8", "surrogatepass")
    if "b64" in case:
        return base64.b64decode(case["b64"])
    return gzip.decompress(base64.b64decode(case["gz_b64"]))


@pytest.mark.parametrize("case", _corpus("http"), ids=lambda c: c["id"])
def test_http_corpus(live_server, case):
    """Each case on a real server (its header bytes as sent), with its status and words."""
    with httpx.Client(base_url=live_server.url, timeout=60) as http:
        headers = {k: _raw_header(v) for k, v in case.get("headers", {}).items()}
        r = http.request(case.get("method", "POST"), case["path"], content=corpus_body(case), headers=headers)
        assert r.status_code == case["status"], r.text
        if case.get("words"):
            detail = r.json().get("detail", r.json().get("error"))
            assert case["words"] in str(detail) and "\n" not in str(detail) and len(str(detail)) < 600
        assert internal_errors(http.get("/metrics").text) == 0
        assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize("case", _corpus("grpc"), ids=lambda c: c["id"])
def test_grpc_corpus(grpc_server, case):
    import grpc

    port = grpc_server.app.state.service.grpc_port
    with pytest.raises(grpc.RpcError) as info:
        _raw_call(port, case.get("method", "ModelInfer"), corpus_body(case))
    assert info.value.code().name == case["code"], info.value
    if case.get("words"):
        assert case["words"] in info.value.details()
    assert _metric(grpc_server.app.state.service.metrics.render().decode(), "attn_export_grpc_requests_total",
                   '{code="INTERNAL",method="ModelInfer"}') == 0  # fmt: skip
