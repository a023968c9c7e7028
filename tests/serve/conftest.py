"""Fixtures of the service tests (the stand-in detector and what it finds: see serve_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import CLASSES, SIZE, LiveServer, StandInDetector, client_for, make_settings


@pytest.fixture(scope="session")
def standin_onnx(tmp_path_factory) -> Path:
    """The stand-in exported with attn-export (dynamic batch) and stamped with the class names."""
    from attn_export.export import export_onnx
    from attn_export.serve.loader import _stamp

    path = tmp_path_factory.mktemp("model") / "standin.onnx"
    result = export_onnx(StandInDetector(), path, (3, SIZE, SIZE), batch=(1, 1, 8), seed=0)
    assert result.ok
    _stamp(path, {"classes": CLASSES})
    return path


@pytest.fixture(scope="session")
def standin_checkpoint(tmp_path_factory) -> Path:
    """The stand-in as an attn-export checkpoint (its architecture registered for the test session)."""
    from attn_export.export import save_checkpoint
    from attn_export.export.checkpoint import architectures

    architectures()["StandInDetector"] = StandInDetector
    path = tmp_path_factory.mktemp("ckpt") / "standin.pt"
    save_checkpoint(path, StandInDetector(), "StandInDetector", {}, (3, SIZE, SIZE), meta={"classes": CLASSES})
    return path


@pytest.fixture(scope="module")
def client(standin_onnx):
    """A TestClient of the service on the stand-in (module-wide)."""
    with client_for(make_settings(standin_onnx, max_body_bytes=2 * 1024 * 1024, max_pixels=4_000_000)) as c:
        yield c


@pytest.fixture(scope="module")
def live_server(standin_onnx):
    from attn_export.serve.app import create_app

    settings = make_settings(
        standin_onnx, max_batch=8, max_wait_ms=20.0, max_body_bytes=2 * 1024 * 1024, max_pixels=4_000_000
    )
    with LiveServer(create_app(settings)) as server:
        yield server
