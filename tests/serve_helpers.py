"""Helpers of the service tests: a stand-in detector, images that it finds, apps and live servers.

The stand-in has the shapes detector's I/O contract ((B, 3, S, S) in [0, 1] -> (B, N, 4 + 4): boxes
``x1, y1, x2, y2`` in input pixels, then four class scores) and a behaviour a test can predict: one
candidate per 32 x 32 cell of the input, boxed by the cell, scoring class 0 for red, 1 for green, 2 for
blue (``relu(channel - mean of the other two)``: black and the grey letterbox padding score 0). A pure
colour square covering one cell gives exactly one detection of its colour's class, boxed by that cell.
It exports in about a second, where the real detector takes a minute.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

CLASSES = ["circle", "triangle", "rectangle", "star"]
SIZE = 320
CELL = 32


class StandInDetector(nn.Module):
    """See the module docstring."""

    def __init__(self, size: int = SIZE, cell: int = CELL, num_classes: int = 4) -> None:
        super().__init__()
        self.cell = cell
        n = size // cell
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        x1, y1 = (xs.flatten() * cell).float(), (ys.flatten() * cell).float()
        self.register_buffer("boxes", torch.stack([x1, y1, x1 + cell, y1 + cell], -1))
        w = torch.zeros(3, num_classes)
        for c in range(3):
            w[:, c] = -0.5
            w[c, c] = 1.0
        self.register_buffer("weight", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = nn.functional.avg_pool2d(x, self.cell).flatten(2).transpose(1, 2)  # (B, N, 3)
        scores = torch.relu(p @ self.weight).clamp(max=1.0)
        boxes = self.boxes.unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([boxes, scores], -1)


COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}


def make_image(
    size: tuple[int, int] = (SIZE, SIZE),
    squares: list[tuple[int, int, int, int]] = (),
    fmt: str = "PNG",
    **save,
) -> bytes:
    """An image (W, H) of black with pure-colour squares ``(class_id, x, y, side)``, encoded as ``fmt``."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    for cls, x, y, side in squares:
        arr[y : y + side, x : x + side] = COLOURS[cls]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **save)
    return buf.getvalue()


def cell_square(cls: int, row: int, col: int) -> tuple[int, int, int, int]:
    return (cls, col * CELL, row * CELL, CELL)


def make_settings(model: Path, **overrides):
    from attn_export.serve.settings import Settings

    base = {"model": model, "threads": 1, "max_wait_ms": 2.0, "access_log": False, "log_level": "warning"}
    return Settings(**(base | overrides))


def _test_client():
    import warnings

    with warnings.catch_warnings():  # starlette asks for httpx2; httpx works
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    return TestClient


@contextlib.contextmanager
def client_for(settings, **kwargs):
    from attn_export.serve.app import create_app

    TestClient = _test_client()

    app = create_app(settings, **kwargs)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client.get)
        yield client


def wait_ready(get, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("the service did not get ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a thread."""

    def __init__(self, app, **config) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, **config)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended")
            time.sleep(0.05)
        raise RuntimeError("the live server did not get ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ------------------------------------------------------------------------------------------ bad inputs


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` (a decompression bomb as far as the header goes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A real PNG of 6000 x 6000 black pixels (36 Mpx) in a few tens of kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


_TEXT_FORM = b'--b\r\nContent-Disposition: form-data; name="images"\r\n\r\nnot a file\r\n--b--\r\n'


def bad_inputs(max_body: int) -> list[tuple[str, dict, int, str, str]]:
    """``(name, request kwargs, status, error kind, words the detail must hold)`` of inputs the service refuses.

    For a server with ``max_body_bytes = max_body``, ``max_pixels`` <= 4 Mpx and ``max_images`` 16.
    """
    good = make_image()
    jpeg = make_image(fmt="JPEG")
    png = make_image((64, 64), [(0, 0, 0, 32)])
    corrupt_png = png[:40] + bytes(b ^ 0x5A for b in png[40:-12]) + png[-12:]
    files = lambda data, name="x.bin", ctype="application/octet-stream": {  # noqa: E731
        "files": {"images": (name, data, ctype)}
    }
    # fmt: off
    return [
        ("empty body", {"content": b""}, 400, "empty_body", "empty"),
        ("empty file", files(b"", "empty.jpg", "image/jpeg"), 400, "empty_image", "empty"),
        ("truncated JPEG", files(jpeg[: len(jpeg) // 2], "cut.jpg", "image/jpeg"), 400, "undecodable_image", "JPEG"),
        ("corrupt PNG", files(corrupt_png, "bad.png", "image/png"), 400, "undecodable_image", "PNG"),
        ("text file", files(b"hello, this is not an image\n" * 20, "notes.txt", "text/plain"), 415, "unsupported_type",
         "text"),
        ("GIF", files(_gif(), "a.gif", "image/gif"), 415, "unsupported_type", "GIF"),
        ("random bytes", files(bytes(range(256)) * 4), 415, "unsupported_type", "not an image"),
        ("bomb header", files(_png_header_only(100_000, 100_000), "bomb.png", "image/png"), 413, "too_many_pixels",
         "large"),
        ("bomb", files(_bomb_png(), "bomb.png", "image/png"), 413, "too_many_pixels", "megapixels"),
        ("50 MB upload", files(b"\xff\xd8\xff" + bytes(50 * 1024 * 1024), "huge.jpg", "image/jpeg"), 413,
         "payload_too_large", f"{max_body:,}"),
        ("raw body, JSON type", {"content": b'{"a": 1}', "headers": {"content-type": "application/json"}}, 415,
         "unsupported_media_type", "Content-Type"),
        ("raw body, text", {"content": b"plain text", "headers": {"content-type": "image/png"}}, 415,
         "unsupported_type", "text"),
        ("form with text only", {"content": _TEXT_FORM, "headers": {"content-type": "multipart/form-data; boundary=b"}},
         400, "no_image", "no image"),
        ("urlencoded form", {"data": {"images": "not a file"}}, 415, "unsupported_media_type", "Content-Type"),
        ("too many images", {"files": [("images", ("a.png", good, "image/png"))] * 17}, 413, "too_many_images",
         "at most 16"),
        ("broken multipart", {"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data"}},
         400, "bad_request", "boundary"),
        ("conf above 1", {"params": {"conf": 2}, **files(good, "a.png", "image/png")}, 422, "invalid_parameter",
         "conf"),
        ("negative iou", {"params": {"iou": -0.1}, **files(good, "a.png", "image/png")}, 422, "invalid_parameter",
         "iou"),
        ("max_det 0", {"params": {"max_det": 0}, **files(good, "a.png", "image/png")}, 422, "invalid_parameter",
         "max_det"),
        ("max_det text", {"params": {"max_det": "many"}, **files(good, "a.png", "image/png")}, 422,
         "invalid_parameter", "max_det"),
        ("unknown format", {"params": {"format": "gif"}, **files(good, "a.png", "image/png")}, 422,
         "invalid_parameter", "format"),
        ("png of two images", {"params": {"format": "png"}, "files": [("images", ("a.png", good, "image/png"))] * 2},
         400, "png_needs_one_image", "one image"),
    ]
    # fmt: on
