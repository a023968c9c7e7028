"""The load test's HTTP client: loopback URLs only, and the request it sends."""

from __future__ import annotations

import pytest

from attn_export.bench import load_client


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"])
def test_loopback_urls_pass(url):
    load_client.check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:80"])
def test_other_urls_are_refused(url):
    with pytest.raises(SystemExit, match="not a loopback address"):
        load_client.check_loopback(url)


def test_build_request_is_a_multipart_post():
    payload = load_client.build_request("http://127.0.0.1:8000", {"conf": 0.5}, b"\xff\xd8\xffdata", "a.jpg")
    head, _, body = payload.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /detect?conf=0.5 HTTP/1.1\r\nHost: 127.0.0.1:8000")
    assert f"Content-Length: {len(body)}".encode() in head
    assert b'name="images"; filename="a.jpg"' in body and b"\xff\xd8\xffdata" in body
