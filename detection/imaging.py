"""Image decoding for the service, with the checks that keep bad uploads from hurting it.

:func:`decode` takes the bytes of one upload and returns the model input (letterboxed, CHW float32)
and what is needed to map boxes back to the original pixels. It refuses, with an :class:`InputError`
naming the problem: empty data, data that is no image (text, say), image types other than JPEG, PNG,
WebP and BMP, images over the pixel or side limits (checked from the header, before any pixel is
decoded: decompression bombs never get decoded), and images that fail to decode (truncated files).

Large images are shrunk cheaply before the letterbox: JPEG in the decoder itself (DCT scaling, Pillow's
``draft``), others by an integer box reduction, never below twice the letterbox size, so the
letterbox sees at most about 4x the pixels it keeps. The letterbox is the one the model was trained
with, :func:`attn_export.detection.postprocess.letterbox_u8`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from attn_export.detection.postprocess import PAD_VALUE, letterbox_u8, scale_boxes, to_input

#: Accepted image types: Pillow's format name -> MIME type.
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
MIME_TYPES = frozenset(FORMATS.values()) | {"image/jpg", "image/x-ms-bmp", "image/x-bmp"}
ACCEPTED = "JPEG, PNG, WebP or BMP"

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)


class InputError(ValueError):
    """A request input the service refuses: an HTTP status, a short kind and a message for the client."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def sniff(data: bytes) -> str | None:
    """The type of ``data`` from its first bytes: a Pillow format name, another name, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace").strip()
        return "AVIF" if brand.startswith("avi") else f"an ISO media file ({brand})"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def _looks_like_text(data: bytes) -> str | None:
    head = data[:256]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end
            return None
        text = head[: e.start].decode("utf-8")
    if not text or any(ord(c) < 32 and c not in "\t\r\n\f" for c in text):
        return None
    return text


def describe_unknown(data: bytes) -> str:
    """What to tell a client whose data is not a supported image."""
    kind = sniff(data)
    if kind in FORMATS:
        return f"the data starts like a {kind} image but is not a valid one"
    if kind is not None:
        return f"unsupported image type: {kind}; send {ACCEPTED}"
    text = _looks_like_text(data)
    if text is not None:
        preview = " ".join(text.split())[:40]
        return f"not an image: the data is text ({preview!r}); send {ACCEPTED}"
    return f"not an image of a known type (first bytes {data[:8].hex()}); send {ACCEPTED}"


@dataclass
class Decoded:
    """One decoded, letterboxed image."""

    pixels: np.ndarray  # (3, S, S) uint8 (rect letterbox: (3, h, w)); to_input() makes the model input of it
    width: int  # original size, after the EXIF orientation is applied
    height: int
    format: str
    scale: float  # letterbox scale and padding, on the (possibly shrunk) decoded image
    pad: tuple[int, int]
    decoded_hw: tuple[int, int]  # the size of the image the letterbox saw
    full: Image.Image | None = None  # the full-size RGB image, when asked for (drawing)

    @property
    def input(self) -> np.ndarray:
        """The model input: (3, S, S) float32 in [0, 1]."""
        return to_input(self.pixels)

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (K, 4) in letterboxed-input pixels -> original-image pixels, clipped to the image."""
        out = scale_boxes(boxes, self.scale, self.pad)
        dh, dw = self.decoded_hw
        out = out * np.array([self.width / dw, self.height / dh] * 2, np.float32)
        out[:, 0::2] = out[:, 0::2].clip(0, self.width)
        out[:, 1::2] = out[:, 1::2].clip(0, self.height)
        return out


def _open(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    if not data:
        raise InputError(400, "empty_image", "the image is empty (0 bytes)")
    kind = sniff(data)
    if kind not in FORMATS:
        raise InputError(415, "unsupported_type", describe_unknown(data))
    try:
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as e:
        raise InputError(
            413, "too_many_pixels", f"the image is too large to decode (a decompression bomb?): {e}"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise InputError(400, "undecodable_image", describe_unknown(data)) from e
    except Exception as e:  # header unreadable
        raise InputError(400, "undecodable_image", f"cannot read the {kind} image header: {e}") from e
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(400, "undecodable_image", f"the {kind} image has no pixels ({w}x{h})")
    if w * h > max_pixels or max(w, h) > max_side:
        raise InputError(
            413,
            "too_many_pixels",
            f"the image is {w}x{h} = {w * h / 1e6:.1f} megapixels; this server decodes at most "
            f"{max_pixels / 1e6:.1f} megapixels and {max_side} pixels a side",
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode -> 8-bit RGB, faithfully: 16- and 32-bit greys are scaled to 0..255 (Pillow's own
    conversion clips them), and transparency is composited over the letterbox grey, the model's "nothing
    here" (converting to RGB would show whatever colour the transparent pixels happen to hold)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint32)
            grey = ((arr * 255 + 32767) // 65535).astype(np.uint8)  # 65535 -> 255, rounded
        else:  # 32-bit integers or floats: stretch the range that is there
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            grey = (
                np.zeros(arr.shape, np.uint8)
                if hi <= lo
                else np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
            )
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (PAD_VALUE, PAD_VALUE, PAD_VALUE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr


def open_image(data: bytes, max_pixels: int = 40_000_000, max_side: int = 20_000) -> Image.Image:
    """The image's header read (type, size) and checked against the limits; no pixel is decoded yet."""
    return _open(data, max_pixels, max_side)


def decode(
    data: bytes,
    size: int = 320,
    max_pixels: int = 40_000_000,
    max_side: int = 20_000,
    keep_full: bool = False,
    stride: int | None = None,
) -> Decoded:
    """Decode and letterbox one image; :class:`InputError` on anything the service refuses."""
    return decode_image(_open(data, max_pixels, max_side), size, keep_full, stride)


def decode_image(
    img: Image.Image, size: int = 320, keep_full: bool = False, stride: int | None = None, min_side: int = 0
) -> Decoded:
    """Decode an image opened by :func:`open_image` and letterbox it (``stride``: to the smallest rectangle
    of whole strides, for a graph with free height and width; else to the square)."""
    fmt = img.format or "?"
    w0, h0 = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
        if fmt == "JPEG" and not keep_full:
            s = min(size / w0, size / h0)
            img.draft("RGB", (max(1, math.ceil(2 * s * w0)), max(1, math.ceil(2 * s * h0))))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        img = _to_rgb(img)
    except Exception as e:  # truncated or corrupt data: Pillow raises OSError, SyntaxError, ValueError...
        raise InputError(400, "undecodable_image", f"cannot decode the {fmt} image: {e}") from e
    # the original size in the displayed orientation (EXIF orientations 5-8 swap the axes)
    width, height = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
    dw, dh = img.size
    full = img if keep_full else None
    s = min(size / dw, size / dh)
    k = int(1 / (2 * s)) if s < 0.5 else 1
    small = img.reduce(k) if k >= 2 else img
    arr = np.asarray(small, dtype=np.uint8)
    if full is None:
        img.close()  # the decoded pixels go now, not when the garbage collector gets to them
    del small
    pixels, scale, pad = letterbox_u8(arr, size, stride, min_side)
    return Decoded(pixels, width, height, fmt, scale, pad, arr.shape[:2], full)


_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw(image: Image.Image, boxes: np.ndarray, scores: np.ndarray, names: list[str], class_ids) -> bytes:
    """The image with its boxes and labels drawn, as PNG bytes."""
    img = image.convert("RGB").copy()
    canvas = ImageDraw.Draw(img)
    side = max(img.size)
    line = max(1, round(side / 300))
    font_size = max(10, round(side / 40))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for box, score, cid, name in zip(boxes, scores, class_ids, names, strict=True):
        colour = _COLOURS[int(cid) % len(_COLOURS)]
        x1, y1, x2, y2 = (float(v) for v in box)
        canvas.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        label = f"{name} {score:.2f}"
        tx, ty = x1, max(0.0, y1 - font_size - 2 * line)
        bbox = canvas.textbbox((tx, ty), label, font=font)
        canvas.rectangle(bbox, fill=colour)
        canvas.text((tx, ty), label, fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
