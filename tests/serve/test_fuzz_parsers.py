"""Property tests (Hypothesis) of every parser of client data in the serving path.

Each parser, given anything, returns its result or raises its 4xx error (``ProtocolError``, ``InputError``,
``ContractError``) with a one-line message: never another exception (the 500 of the last guard). Where a
parser has an inverse that is easy to write independently (a multipart form, the binary tensor layout,
gzip members, base64 rows), the round trip is checked against the input. Time-bounded: see ``fuzzkit``.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import struct
import zlib

import pytest
from fuzzkit import ROUND, budget, rss_mb, run_for
from hypothesis import assume, given
from hypothesis import strategies as st
from serve_helpers import make_image

from attn_export.detection.contract import ContractError, Params, image_bytes, request_params, split_bytes
from attn_export.detection.imaging import InputError, decode
from attn_export.serve.auth import key_refused
from attn_export.serve.forms import parse_form, prefers_png, request_images
from attn_export.serve.v2_http import _decompress, content_coding, load_json, parse_infer, requested_outputs
from attn_export.serve.v2_protocol import ProtocolError

SECONDS = 0.5  # per parser by default: about 10 s for the file

MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
#: text with everything a client can put in a JSON string: lone surrogates, NUL, newlines, non-ASCII digits
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
#: JSON-ish values as json.loads can return them, and worse (huge ints, nan, surrogates), nested
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSONISH = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                       max_leaves=20)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    before = rss_mb()
    yield
    assert rss_mb() - before < 300, f"the parsers' fuzzing grew this process by {rss_mb() - before:.0f} MiB"


def one_line_4xx(e: Exception) -> None:
    status = getattr(e, "status", 400)
    message = getattr(e, "message", str(e))
    assert 400 <= status < 500, (status, message)
    assert message and "\n" not in message and len(message) < 600, message


def _fuzz(check, seconds: float = SECONDS) -> None:
    assert run_for(budget(seconds), check) >= 1


# ------------------------------------------------------------------------------------------ /v2 infer
def _request(rows, as_binary: bool) -> tuple[bytes, str | None]:
    if as_binary:
        raw = b"".join(struct.pack("<I", len(r)) + r for r in rows)
        tensor = {"name": "image", "datatype": "BYTES", "shape": [len(rows), 1],
                  "parameters": {"binary_data_size": len(raw)}}  # fmt: skip
        head = json.dumps({"inputs": [tensor]}).encode()
        return head + raw, str(len(head))
    data = [base64.b64encode(r).decode() for r in rows]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(rows), 1], "data": data}]}
    return json.dumps(body).encode(), None


IMAGE_ROWS = st.lists(st.tuples(st.sampled_from(MAGIC), st.binary(max_size=64)).map(lambda t: t[0] + t[1]),
                      min_size=1, max_size=4)  # fmt: skip


def test_parse_infer_round_trip():
    @given(rows=IMAGE_ROWS, as_binary=st.booleans())
    @ROUND
    def check(rows, as_binary):
        body, length = _request(rows, as_binary)
        req, images = parse_infer(body, length, max_images=4)
        assert images == rows and req["inputs"][0]["shape"] == [len(rows), 1]

    _fuzz(check)


def test_parse_infer_takes_any_bytes():
    @given(body=st.binary(max_size=300), length=st.none() | TEXT | st.integers(0, 400).map(str))
    @ROUND
    def check(body, length):
        try:
            parse_infer(body, length, max_images=4)
        except ProtocolError as e:
            one_line_4xx(e)

    _fuzz(check)


def test_parse_infer_takes_any_json():
    """Valid requests with one part replaced by any JSON-ish value (and nested data, ids, parameters)."""
    fields = st.sampled_from(["name", "datatype", "shape", "data", "parameters", "inputs", "id", "root", "extra"])

    @given(rows=IMAGE_ROWS, field=fields, value=JSONISH, deep=st.integers(0, 3000))
    @ROUND
    def check(rows, field, value, deep):
        body, _ = _request(rows, as_binary=False)
        req = json.loads(body)
        tensor = req["inputs"][0]
        if field in ("inputs", "id"):
            req[field] = value
        elif field == "root":
            req = value
        elif field == "extra":
            req["inputs"].append(value)
        else:
            tensor[field] = value
        try:
            text = json.dumps(req, allow_nan=True)
        except (ValueError, UnicodeEncodeError):
            assume(False)
        if deep and text.endswith("}"):  # a key nested past the JSON parser's recursion limit, or near it
            text = text[:-1] + ', "nest": ' + "[" * deep + "]" * deep + "}"
        try:
            _, images = parse_infer(text.encode("utf-8", "surrogatepass"), None, max_images=4)
            assert all(isinstance(i, bytes) for i in images)
        except ProtocolError as e:
            one_line_4xx(e)

    _fuzz(check)


def test_load_json_any_bytes_and_any_depth():
    @given(text=st.binary(max_size=200) | TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
           depth=st.integers(0, 100_000), bracket=st.sampled_from(["[", '{"a":']))  # fmt: skip
    @ROUND
    def check(text, depth, bracket):
        body = bracket.encode() * depth + text
        try:
            load_json(body)
        except ProtocolError as e:
            one_line_4xx(e)

    _fuzz(check)


def test_requested_outputs_any_json():
    @given(req=st.dictionaries(st.sampled_from(["outputs", "parameters", "x"]), JSONISH, max_size=3))
    @ROUND
    def check(req):
        try:
            for name, binary in requested_outputs(req):
                assert isinstance(name, str) and isinstance(binary, bool)
        except ProtocolError as e:
            one_line_4xx(e)

    _fuzz(check)


# ------------------------------------------------------------------------------------------ compression
def test_decompress_round_trip_and_any_bytes():
    @given(
        data=st.binary(max_size=2000),
        cuts=st.lists(st.integers(0, 2000), max_size=3),
        coding=st.sampled_from(["gzip", "GZIP", "x-gzip", "deflate", "Deflate", " gzip"]),
        junk=st.binary(max_size=20),
        limit=st.integers(1, 3000),
    )
    @ROUND
    def check(data, cuts, coding, junk, limit):
        if "gzip" in coding.lower():
            bounds = sorted({0, len(data), *(min(c, len(data)) for c in cuts)})
            packed = b"".join(gzip.compress(data[a:b]) for a, b in itertools.pairwise(bounds))
            packed = packed or gzip.compress(b"")
        else:
            packed = zlib.compress(data)
        try:
            out = _decompress(packed, coding, limit)
            assert out == data and len(data) <= limit
        except ProtocolError as e:
            assert e.status == 413 and len(data) > limit, e.message
        for bad in (packed + junk, packed[: len(packed) // 2], junk):
            try:
                _decompress(bad, coding, limit)
            except ProtocolError as e:
                one_line_4xx(e)

    _fuzz(check)


def test_content_coding_any_header():
    @given(header=st.none() | TEXT)
    @ROUND
    def check(header):
        try:
            assert content_coding(header) in (None, "gzip", "x-gzip", "deflate")
        except ProtocolError as e:
            assert e.status == 415
            one_line_4xx(e)

    _fuzz(check, 0.3)


# ------------------------------------------------------------------------------------------ the contract
def test_split_bytes_round_trip_and_any_bytes():
    @given(rows=st.lists(st.binary(max_size=50), max_size=6), raw=st.binary(max_size=100), count=st.integers(0, 8))
    @ROUND
    def check(rows, raw, count):
        packed = b"".join(struct.pack("<I", len(r)) + r for r in rows)
        assert split_bytes(packed, len(rows)) == rows
        try:
            split_bytes(raw, count)
        except ContractError as e:
            one_line_4xx(e)

    _fuzz(check)


def test_image_bytes_any_row():
    @given(value=JSONISH | st.binary(max_size=80), image=st.tuples(st.sampled_from(MAGIC), st.binary(max_size=40)))
    @ROUND
    def check(value, image):
        try:
            assert isinstance(image_bytes(value), bytes)
        except ContractError as e:
            one_line_4xx(e)
        data = image[0] + image[1]
        assert image_bytes(data) == data == image_bytes(base64.b64encode(data).decode())

    _fuzz(check)


def test_request_params_any_values():
    defaults = Params(0.25, 0.45, 100)
    number = st.one_of(JSONISH, st.dictionaries(st.sampled_from(["double_param", "int64_param"]), LEAF, max_size=1))

    @given(given_=st.dictionaries(st.sampled_from(["conf", "iou", "max_det", "other"]), number, max_size=4),
           conf=st.floats(0, 1), max_det=st.integers(1, 100))  # fmt: skip
    @ROUND
    def check(given_, conf, max_det):
        try:
            p = request_params(given_, defaults)
            assert 0 <= p.conf <= 1 and 0 <= p.iou <= 1 and 1 <= p.max_det <= 100
        except ContractError as e:
            one_line_4xx(e)
        assert request_params({"conf": conf, "max_det": max_det}, defaults) == Params(conf, 0.45, max_det)

    _fuzz(check)


# ------------------------------------------------------------------------------------------ /detect
def _form(parts: list[tuple[str | None, bytes]], boundary: str) -> bytes:
    """A multipart/form-data body written by hand (the reference the parser is checked against)."""
    out = b""
    for filename, data in parts:
        disposition = 'form-data; name="images"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


NAMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=12)


def test_parse_form_round_trip_and_mutations():
    @given(
        files=st.lists(st.tuples(NAMES, st.binary(max_size=80)), min_size=1, max_size=5),
        texts=st.lists(st.binary(max_size=20).filter(lambda b: b"--" not in b and b"\r" not in b), max_size=2),
        boundary=st.text(st.sampled_from("abcXYZ0189'()+_,-./:=?"), min_size=1, max_size=30),
        flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
        cut=st.integers(0, 10_000),
    )
    @ROUND
    def check(files, texts, boundary, flips, cut):
        assume(all(f"--{boundary}".encode() not in data for _, data in files))
        body = _form([*files, *((None, t) for t in texts)], boundary)
        ctype = f"multipart/form-data; boundary={boundary}"
        assert parse_form(body, ctype, max_images=5) == files
        mutated = bytearray(body[: max(1, cut % (len(body) + 1))])
        for at, value in flips:
            if mutated:
                mutated[at % len(mutated)] = value
        try:
            parse_form(bytes(mutated), ctype, max_images=5)
        except InputError as e:
            one_line_4xx(e)

    _fuzz(check)


def test_request_images_any_content_type_and_body():
    from serve_helpers import make_settings

    settings = make_settings("unused.onnx", max_images=4)

    @given(ctype=st.none() | TEXT | st.just("multipart/form-data; boundary=") .map(lambda s: s + "x"),
           body=st.binary(max_size=200))  # fmt: skip
    @ROUND
    def check(ctype, body):
        try:
            request_images(body, ctype, settings)
        except InputError as e:
            one_line_4xx(e)

    _fuzz(check)


def test_prefers_png_any_accept_header():
    @given(header=st.none() | TEXT, q_png=st.floats(0.01, 1), q_json=st.floats(0.01, 1))
    @ROUND
    def check(header, q_png, q_json):
        assert prefers_png(header) in (True, False)
        both = f"image/png;q={q_png}, application/json;q={q_json}"
        assert prefers_png(both) is (q_png > q_json)

    _fuzz(check, 0.3)


def test_api_key_any_header():
    from pydantic import SecretStr

    @given(given_=st.none() | TEXT)
    @ROUND
    def check(given_):
        refused = key_refused(SecretStr("s3cret"), given_)
        assert (refused is None) is (given_ == "s3cret")

    _fuzz(check, 0.3)


# ------------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def seeds() -> list[bytes]:
    return [make_image((48, 40), [(0, 8, 8, 16)], fmt=fmt) for fmt in ("PNG", "JPEG", "BMP", "WEBP")]


def test_image_decoding_of_mutated_images(seeds):
    """Flipped, cut and spliced bytes of valid PNG, JPEG, BMP and WebP images: decoded, or a 4xx InputError."""

    @given(
        seed=st.integers(0, 3),
        flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=8),
        cut=st.none() | st.integers(1, 100_000),
        insert=st.binary(max_size=16),
    )
    @ROUND
    def check(seed, flips, cut, insert):
        data = bytearray(seeds[seed])
        for at, value in flips:
            data[at % len(data)] = value
        at = len(data) // 2
        data[at:at] = insert
        if cut is not None:
            data = data[: cut % len(data) + 1]
        try:
            d = decode(bytes(data), 64, max_pixels=4_000_000, max_side=4000)
            assert d.pixels.shape[-1] == 3 or d.pixels.shape[0] == 3 or d.pixels.ndim >= 2
        except InputError as e:
            one_line_4xx(e)

    _fuzz(check, 1.0)


# ------------------------------------------------------------------------------------------ gRPC
def test_grpc_messages_any_bytes_and_fields():
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2 as pb

    from attn_export.serve.v2_grpc import infer_images, parse_request, requested_outputs

    @given(
        raw=st.binary(max_size=200),
        name=TEXT,
        datatype=st.sampled_from(["BYTES", "FP32", ""]) | TEXT,
        shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        contents=st.lists(st.binary(max_size=30), max_size=3),
        raw_contents=st.lists(st.binary(max_size=30), max_size=2),
        outputs=st.lists(TEXT, max_size=2),
    )
    @ROUND
    def check(raw, name, datatype, shape, contents, raw_contents, outputs):
        try:
            parse_request(pb.ModelInferRequest, raw)
        except ProtocolError as e:
            one_line_4xx(e)
        try:
            request = pb.ModelInferRequest(model_name="standin")
        except ValueError:
            return
        try:
            tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        except ValueError:  # a str protobuf cannot hold (a lone surrogate): no client can send it either
            return
        tensor.contents.bytes_contents.extend(contents)
        request.raw_input_contents.extend(raw_contents)
        for o in outputs:
            with pytest.raises(ValueError) if not _utf8(o) else _nothing():
                request.outputs.add(name=o)
        again = parse_request(pb.ModelInferRequest, request.SerializeToString())
        assert again == request
        try:
            infer_images(again, max_images=4)
            requested_outputs(again)
        except ProtocolError as e:
            one_line_4xx(e)

    _fuzz(check)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
