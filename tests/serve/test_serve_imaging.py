"""Decoding uploads: the letterbox matches training's bit for bit, image modes, sniffing, limits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from attn_export.detect.postprocess import letterbox as reference_letterbox
from attn_export.serve.imaging import InputError, decode, describe_unknown, draw, letterbox, sniff


@pytest.mark.parametrize(
    "shape", [(468, 396), (100, 50), (320, 320), (1, 1), (640, 480), (33, 700), (319, 321), (2000, 90), (10, 10)]
)
@pytest.mark.parametrize("size", [320, 64])
def test_letterbox_is_the_training_letterbox_bit_for_bit(shape, size):
    img = np.random.default_rng(sum(shape) + size).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, scale, pad = letterbox(img, size)
    ref, ref_scale, ref_pad = reference_letterbox(img, size)
    assert (scale, pad) == (ref_scale, ref_pad)
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape == (3, size, size)
    assert np.array_equal(ours, ref)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("1", "BMP"),
     ("RGBA", "WEBP"), ("P", "BMP")],
)  # fmt: skip
def test_image_modes_decode_to_rgb(mode, fmt):
    img = Image.new("RGB", (200, 100), (200, 30, 30)).convert(mode)
    d = decode(_encode(img, fmt), 320)
    assert (d.width, d.height, d.format) == (200, 100, fmt)
    assert d.input.shape == (3, 320, 320) and d.input.dtype == np.float32
    assert d.input.min() >= 0.0 and d.input.max() <= 1.0


def test_animated_webp_uses_the_first_frame():
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    d = decode(data, 64)
    assert d.input[0, 32, 32] == pytest.approx(1.0) and d.input[2, 32, 32] == pytest.approx(0.0)


def test_to_original_round_trips_through_letterbox_and_shrinking():
    img = Image.new("RGB", (1900, 1000))
    d = decode(_encode(img, "PNG"), 320)  # reduced 2x first, then letterboxed
    assert d.decoded_hw == (500, 950)
    px, py, s = d.pad[0], d.pad[1], d.scale
    boxes = np.array([[px, py, px + 950 * s, py + 500 * s], [-5, -5, 400, 400]], np.float32)
    np.testing.assert_allclose(d.to_original(boxes), [[0, 0, 1900, 1000], [0, 0, 1900, 1000]], atol=0.01)


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"\xff\xd8\xff\xe0", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"RIFF\0\0\0\0WEBPVP8 ", "WEBP"), (b"BM", "BMP"),
     (b"GIF89a", "GIF"), (b"\0\0\0\x1cftypavif", "AVIF"), (b"%PDF-1.7", "PDF"), (b"hello", None)],
)  # fmt: skip
def test_sniff(data, kind):
    assert sniff(data) == kind


def test_describe_unknown():
    assert "unsupported image type: AVIF" in describe_unknown(b"\0\0\0\x1cftypavif\0\0")
    assert "the data is text ('{\"a\": 1}')" in describe_unknown(b'{"a": 1}')
    assert "first bytes 00010203" in describe_unknown(bytes(range(32)))
    assert "text" in describe_unknown("héllo wörld ".encode() * 30)  # UTF-8 cut mid-character at 256 bytes


@pytest.mark.parametrize(
    ("data", "status", "kind"),
    [(b"", 400, "empty_image"), (b"GIF89a" + bytes(20), 415, "unsupported_type"),
     (b"\x89PNG\r\n\x1a\n" + bytes(30), 400, "undecodable_image")],
)  # fmt: skip
def test_refusals(data, status, kind):
    with pytest.raises(InputError) as e:
        decode(data)
    assert (e.value.status, e.value.kind) == (status, kind)


def test_limits_are_checked_before_decoding():
    data = _encode(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(InputError, match=r"3000x2000 = 6\.0 megapixels"):
        decode(data, max_pixels=5_000_000)
    with pytest.raises(InputError, match="2500 pixels a side"):
        decode(data, max_side=2500)
    assert decode(data, max_pixels=6_000_000).width == 3000


def test_draw_returns_a_png_with_the_boxes():
    img = Image.new("RGB", (100, 80))
    png = draw(img, np.array([[10, 20, 50, 60]], np.float32), np.array([0.9], np.float32), ["star"], [3])
    out = Image.open(io.BytesIO(png)).convert("RGB")
    assert out.size == (100, 80) and out.getpixel((10, 40)) == (245, 130, 48)
    assert img.getpixel((10, 40)) == (0, 0, 0)  # the original is untouched
