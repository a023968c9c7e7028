"""Fixtures of the service tests: a TestClient and a live server on the stand-in detector."""

from __future__ import annotations

import pytest
from serve_helpers import LiveServer, client_for, make_settings


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
