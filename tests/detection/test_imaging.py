"""Decoding uploads: the letterbox matches training's bit for bit, image modes, sniffing, limits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from attn_export.detection.imaging import InputError, decode, describe_unknown, draw, sniff
from attn_export.detection.postprocess import PAD_VALUE, letterbox


def reference_letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The letterbox in plain HWC numpy (float32 bilinear, half-pixel centres, edge-clamped, rounded):
    the one the served letterbox, on channel planes, must match bit for bit."""
    h, w = img.shape[:2]
    scale = min(size / h, size / w)
    nh, nw = min(size, round(h * scale)), min(size, round(w * scale))
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2

    def taps(n_out: int, n_in: int):
        src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.intp)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    resized = img
    if (nh, nw) != (h, w):
        (y0, y1, fy), (x0, x1, fx) = taps(nh, h), taps(nw, w)
        f = img.astype(np.float32)
        top = f[y0][:, x0] * (1 - fx)[None, :, None] + f[y0][:, x1] * fx[None, :, None]
        bot = f[y1][:, x0] * (1 - fx)[None, :, None] + f[y1][:, x1] * fx[None, :, None]
        mixed = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
        resized = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    out = np.full((size, size, 3), PAD_VALUE, np.uint8)
    out[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized
    x = np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return x, float(scale), (int(pad_x), int(pad_y))


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


# ------------------------------------------------------------------------------------------ faithful decoding
def _png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (grey 0, RGB 2, grey+alpha 4, RGBA 6), independent of Pillow's encoder."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _unpadded(d, h: int, w: int) -> np.ndarray:
    """The image part of a letterbox that did not resize (HWC uint8)."""
    px, py = d.pad
    return d.pixels[:, py : py + h, px : px + w].transpose(1, 2, 0)


@pytest.mark.parametrize("color_type", [0, 2, 4, 6])
def test_16_bit_pngs_are_scaled_not_clipped(color_type):
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    rng = np.random.default_rng(color_type)
    arr = rng.integers(0, 65536, (40, 64, channels)).astype(np.uint16)
    d = decode(_png16(arr.squeeze(-1) if channels == 1 else arr, color_type), 64)
    got = _unpadded(d, 40, 64).astype(np.float64)
    v = arr.astype(np.float64) / 65535.0 * 255.0  # float64 reference
    colour = v[..., :3] if channels >= 3 else np.repeat(v[..., :1], 3, -1)
    if channels in (2, 4):  # over the letterbox grey
        alpha = v[..., -1:] / 255.0
        colour = colour * alpha + 114.0 * (1 - alpha)
    # one 8-bit step per stage (colour, alpha, blend), not 255s
    assert np.abs(got - colour).max() <= (2.5 if channels in (2, 4) else 1.0)
    assert (got == 255).mean() < 0.02


def test_palette_with_transparency_is_composited_over_the_letterbox_grey():
    img = Image.new("P", (32, 16))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (16, 0, 32, 16))  # right half index 1 (blue); left half index 0 (red, transparent)
    d = decode(_encode(img, "PNG", transparency=0), 32)
    got = _unpadded(d, 16, 32)
    assert (got[:, :16] == 114).all() and (got[:, 16:] == [0, 0, 255]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_the_letterbox_grey(mode):
    rng = np.random.default_rng(3)
    chans = 4 if mode == "RGBA" else 2
    arr = rng.integers(0, 256, (20, 30, chans)).astype(np.uint8)
    d = decode(_encode(Image.fromarray(arr, mode), "PNG"), 30)
    got = _unpadded(d, 20, 30).astype(np.float64)
    a = arr[..., -1:].astype(np.float64) / 255.0
    colour = arr[..., :3] if mode == "RGBA" else np.repeat(arr[..., :1], 3, -1)
    ref = colour * a + 114.0 * (1 - a)
    assert np.abs(got - ref).max() <= 1.0


def test_cmyk_jpeg_keeps_its_colours():
    rgb = Image.new("RGB", (48, 32), (200, 30, 30))
    rgb.paste((20, 160, 60), (24, 0, 48, 32))
    d = decode(_encode(rgb.convert("CMYK"), "JPEG", quality=95), 48)
    got = _unpadded(d, 32, 48).astype(int)
    assert np.abs(got[8:24, 4:20] - [200, 30, 30]).max() <= 12
    assert np.abs(got[8:24, 28:44] - [20, 160, 60]).max() <= 12


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_every_exif_orientation(orientation):
    shown = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3)).astype(np.uint8)
    # what a camera stores for each orientation, so that the display is ``shown`` (EXIF 2.32, by numpy)
    stored = {
        2: shown[:, ::-1],
        3: shown[::-1, ::-1],
        4: shown[::-1],
        5: shown.transpose(1, 0, 2),
        6: np.rot90(shown, 1),
        7: shown[::-1, ::-1].transpose(1, 0, 2),
        8: np.rot90(shown, -1),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    d = decode(_encode(Image.fromarray(np.ascontiguousarray(stored)), "PNG", exif=exif), 40)
    assert (d.width, d.height) == (40, 24)
    np.testing.assert_array_equal(_unpadded(d, 24, 40), shown)
