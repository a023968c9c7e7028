"""HTTP fuzzers: schemathesis against ``/detect`` and the ``/v2`` operations of the OpenAPI schema (valid and
invalid requests generated from it), and a mutation fuzzer of valid ``/v2`` infer and ``/detect`` requests
(bodies flipped, cut and spliced; headers: Content-Encoding, Inference-Header-Content-Length,
Content-Type). No 5xx, the server's count of unexpected errors stays at 0, it keeps answering and its
memory stays bounded. Time-bounded: see ``fuzzkit``.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
import zlib

import httpx
import pytest
from fuzzkit import budget, round_of, rss_mb, run_for
from hypothesis import given
from hypothesis import strategies as st
from serve_helpers import LiveServer, cell_square, make_image, make_settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

NAME = "standin"
SCHEMA_SECONDS = 1.0  # per operation and mode
MUTATION_SECONDS = 4.0
ROUND_TRIP = round_of(8)


@pytest.fixture(scope="module")
def server(standin_onnx):
    from attn_export.serve.app import create_app

    settings = make_settings(standin_onnx, warmup=False, max_body_bytes=512 * 1024, max_pixels=4_000_000)
    app = create_app(settings)
    with LiveServer(app) as live:
        live.app = app
        before = rss_mb()
        yield live
        assert rss_mb() - before < 300, f"RSS grew by {rss_mb() - before:.0f} MiB"
        text = app.state.service.metrics.render().decode()
        assert "attn_export_internal_errors_total{" not in text  # the last guard was never reached
        assert httpx.get(f"{live.url}/healthz", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


V2_OPERATIONS = [
    "GET /v2",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2/models/{model}",
    "GET /v2/models/{model}/ready",
    "GET /v2/models/{model}/config",
    "POST /v2/models/{model}/infer",
    "GET /v2/models/{model}/versions/{version}",
    "GET /v2/models/{model}/versions/{version}/ready",
    "GET /v2/models/{model}/versions/{version}/config",
    "POST /v2/models/{model}/versions/{version}/infer",
    "POST /v2/repository/index",
]


def test_the_schema_describes_the_protocol(api_schema):
    labels = {op.ok().label for op in api_schema.get_all_operations()}
    assert set(V2_OPERATIONS) <= labels and "POST /detect" in labels
    infer = api_schema.find_operation_by_label("POST /v2/models/{model}/infer").definition.raw
    body = infer["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(body)
    assert body["application/json"]["schema"]["properties"]["inputs"]["items"]["properties"]["datatype"]["enum"] == [
        "BYTES"
    ]
    headers = {p["name"] for p in infer["parameters"] if p["in"] == "header"}
    assert "Inference-Header-Content-Length" in headers and "Content-Encoding" in headers
    assert {"200", "400", "404", "413", "503"} <= set(infer["responses"])


@pytest.mark.parametrize(
    ("label", "mode"),
    [
        ("POST /detect", GenerationMode.POSITIVE),
        ("POST /detect", GenerationMode.NEGATIVE),
        ("POST /v2/models/{model}/infer", GenerationMode.POSITIVE),
        ("POST /v2/models/{model}/infer", GenerationMode.NEGATIVE),
        ("POST /v2/models/{model}/versions/{version}/infer", GenerationMode.NEGATIVE),
        ("GET /v2/models/{model}/versions/{version}/config", GenerationMode.POSITIVE),
        ("GET /v2/models/{model}/ready", GenerationMode.POSITIVE),
        ("POST /v2/repository/index", GenerationMode.POSITIVE),
    ],
    ids=lambda v: getattr(v, "value", v),
)
def test_schemathesis_no_server_errors(api_schema, label, mode):
    operation = api_schema.find_operation_by_label(label)
    calls: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode), real_name=st.booleans())
    @ROUND_TRIP
    def check(case, real_name):
        if real_name and case.path_parameters and "model" in case.path_parameters:
            case.path_parameters["model"] = NAME  # past the 404: into the parsing
            if "version" in case.path_parameters:
                case.path_parameters["version"] = "1"
        response = case.call_and_validate(checks=[not_a_server_error], timeout=30)
        calls.append(response.status_code)

    run_for(budget(SCHEMA_SECONDS), check)
    assert calls and all(code < 500 for code in calls), calls


# ------------------------------------------------------------------------------------------ mutations
def _v2_body(image: bytes, binary: bool, params: dict) -> tuple[bytes, dict[str, str]]:
    if binary:
        raw = struct.pack("<I", len(image)) + image
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(raw)}}
        head = json.dumps({"inputs": [tensor], "parameters": params}).encode()
        return head + raw, {"Inference-Header-Content-Length": str(len(head))}
    data = [base64.b64encode(image).decode()]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": data}], "parameters": params}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _mutate(body: bytes, data) -> bytes:
    out = bytearray(body)
    for _ in range(data.draw(st.integers(0, 5))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "dup", "json"]))
        at = data.draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del out[at : at + data.draw(st.integers(1, 32))]
        elif op == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "dup":
            out += out[at : at + data.draw(st.integers(1, 64))]
        elif op == "json":  # JSON tokens that parsers choke on
            token = data.draw(st.sampled_from([b"[" * 3000, b'"\\ud800"', b"1" * 500, b"NaN", b"-Infinity", b"{}",
                                               b"null", b'"\\u0000"', b"1e999", b"[]"]))  # fmt: skip
            out[at:at] = token
    return bytes(out)


#: (a value with a leading space never reaches the server: the HTTP parsers strip it, and httpx refuses to send it)
HEADER_VALUES = st.sampled_from(["²", "1²", "-1", "+3", "3 3", "99999999999999999999999", "", "0x10", "١٢"])


def test_mutated_v2_requests_never_reach_the_last_guard(server):
    images = [make_image((96, 64), [cell_square(0, 1, 1)], fmt=fmt) for fmt in ("PNG", "JPEG")]
    seen: dict[int, int] = {}
    http = httpx.Client(base_url=server.url, timeout=30)

    @given(
        image=st.sampled_from(images),
        binary=st.booleans(),
        params=st.dictionaries(st.sampled_from(["conf", "iou", "max_det"]), st.floats(0.1, 0.9), max_size=2),
        coding=st.sampled_from([None, "gzip", "GZIP", "deflate", "x-gzip", "br", "gzip, identity"]),
        length=st.none() | HEADER_VALUES,
        data=st.data(),
        path=st.sampled_from([f"/v2/models/{NAME}/infer", f"/v2/models/{NAME}/versions/1/infer"]),
    )
    @ROUND_TRIP
    def check(image, binary, params, coding, length, data, path):
        body, headers = _v2_body(image, binary, params)
        body = _mutate(body, data)
        if coding is not None:
            packed = zlib.compress(body) if "deflate" in coding else gzip.compress(body)
            body = _mutate(packed, data) if data.draw(st.booleans()) else packed
            headers["Content-Encoding"] = coding
        raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        if length is not None:
            raw_headers.append((b"Inference-Header-Content-Length", length.encode("latin-1", "replace")
                                if all(ord(c) < 256 for c in length) else length.encode()))  # fmt: skip
        r = http.post(path, content=body, headers=raw_headers)
        assert r.status_code < 500, (r.status_code, r.text, body[:200], headers)
        if r.status_code >= 400:
            message = r.json()["error"]
            assert message and "\n" not in message
        seen[r.status_code] = seen.get(r.status_code, 0) + 1

    try:
        run_for(budget(MUTATION_SECONDS), check)
    finally:
        http.close()
    assert seen.get(400, 0) >= 1, seen


def test_mutated_detect_requests_never_reach_the_last_guard(server):
    image = make_image((96, 64), [cell_square(2, 0, 0)])
    http = httpx.Client(base_url=server.url, timeout=30)

    @given(
        data=st.data(),
        ctype=st.sampled_from(
            [
                "multipart/form-data; boundary=b",
                "image/png",
                "",
                "multipart/form-data",
                'multipart/form-data; boundary="b"',
                "text/plain; charset=²",
            ]
        ),
        query=st.dictionaries(
            st.sampled_from(["conf", "iou", "max_det", "format"]),
            st.sampled_from(["0.5", "1e400", "nan", "²", "-1", "png", "9" * 400, ""]),
            max_size=2,
        ),
        accept=st.sampled_from([None, "image/png", "image/png;q=nan", "*/*;q=1e999", "image/png;q=²"]),
    )
    @ROUND_TRIP
    def check(data, ctype, query, accept):
        form = (
            b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n' + image + b"\r\n--b--\r\n"
        )
        body = _mutate(form if ctype.startswith("multipart") else image, data)
        headers = [(b"content-type", ctype.encode("latin-1", "replace"))]
        if accept is not None:
            headers.append((b"accept", accept.encode("latin-1", "replace")))
        r = http.post("/detect", params=query, content=body, headers=headers)
        assert r.status_code < 500, (r.status_code, r.text, query, ctype)

    try:
        run_for(budget(MUTATION_SECONDS / 2), check)
    finally:
        http.close()


def test_internal_errors_stay_at_zero(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert not re.search(r'^attn_export_http_requests_total\{.*status="5\d\d"\}', text, re.M), text
