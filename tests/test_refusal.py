"""One refusal shape for every HTTP answer agentd refuses with: JSON ``{"error": ...}``."""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.web.test.requesthelper import DummyRequest

from agentd.refusal import Refused
from tests.harness import base_config
from tests.wsclient import handshake_headers


def test_answer_sets_status_json_and_the_refusals_headers() -> None:
    request = DummyRequest([b""])
    body = Refused(429, "too many", (b"allow", b"GET"), retry_after=3).answer(request)
    assert request.responseCode == 429
    assert json.loads(body) == {"error": "too many"}
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert headers.getRawHeaders(b"retry-after") == [b"3"]
    assert headers.getRawHeaders(b"allow") == [b"GET"]


def test_response_is_a_whole_http_answer_that_closes_the_connection() -> None:
    raw = Refused(408, "request not complete in time").response()
    head, body = raw.split(b"\r\n\r\n", 1)
    status, *fields = head.split(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in fields
    assert b"content-type: application/json" in fields
    assert f"content-length: {len(body)}".encode() in fields
    assert json.loads(body) == {"error": "request not complete in time"}


@pytest_twisted.ensureDeferred
async def test_unknown_paths_and_route_refusals_answer_json(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    for path, status, error in (
        ("/nope", 404, "not found"),
        ("/health/nope", 404, "not found"),
        ("/projects/demo/agent/unknown", 404, "no such route"),
        ("/projects/demo/agent/echo", 401, "missing token"),
    ):
        response = await treq.get(gateway.http + path, headers=handshake_headers())
        assert response.code == status, path
        assert response.headers.getRawHeaders("content-type") == ["application/json"], path
        assert await response.json() == {"error": error}, path
