"""The Site around the gateway: static files and their headers, 404s, body limits, metrics."""

from __future__ import annotations

import socket

import pytest_twisted
import treq
from twisted.internet import threads
from twisted.web.http_headers import Headers

from tests.harness import auth, base_config, merge
from tests.servers import free_port


@pytest_twisted.ensureDeferred
async def test_demo_page_and_client_are_served_with_protective_headers(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    for path, kind in (
        ("/", "text/html"),
        ("/agent-client.js", "text/javascript"),
        ("/console.js", "text/javascript"),
    ):
        response = await gateway.get(path)
        assert response.code == 200, path
        assert response.headers.getRawHeaders("content-type")[0].startswith(kind)
        assert response.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
        assert (
            "frame-ancestors 'none'" in response.headers.getRawHeaders("content-security-policy")[0]
        )


@pytest_twisted.ensureDeferred
async def test_demo_page_can_be_turned_off_but_the_client_stays(tmp_path, agentd):
    gateway = agentd(merge(base_config(tmp_path), server={"demo_page": False}))
    assert (await gateway.get("/")).code == 404
    assert (await gateway.get("/agent-client.js")).code == 200


@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_404_without_details(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    for path in ("/nope", "/projects", "/api/nothing", "/../etc/passwd"):
        response = await gateway.get(path)
        assert response.code == 404, path
        assert "Traceback" not in await response.text()


@pytest_twisted.ensureDeferred
async def test_other_methods_are_refused_with_405_in_the_one_json_shape(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    paths = ("/health", "/health/live", "/health/ready", "/api/openapi.json", "/agent-client.js")
    for path in paths:
        response = await treq.request("DELETE", gateway.http + path)
        assert response.code == 405, path
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"], path
        assert b"GET" in response.headers.getRawHeaders(b"allow")[0], path
        assert set(await response.json()) == {"error"}, path
        assert (await treq.head(gateway.http + path)).code == 200, path


def _raw_post(port: int, length: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"PUT /api/keys/anthropic HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % length
        )
        s.sendall(b"x" * min(length, 200_000))
        return s.recv(200)


@pytest_twisted.ensureDeferred
async def test_oversized_request_bodies_are_refused_before_they_are_buffered(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    answer = await threads.deferToThread(_raw_post, gateway.port, 50_000_000)
    assert answer.startswith(b"HTTP/1.1 413")
    response = await treq.get(gateway.http + "/api/keys", headers=auth())
    assert response.code in (200, 503)  # still serving


@pytest_twisted.ensureDeferred
async def test_metrics_can_move_to_their_own_endpoint(tmp_path, agentd):
    metrics_port = free_port()
    gateway = agentd(
        merge(
            base_config(tmp_path),
            server={"metrics_listen": [f"tcp:{metrics_port}:interface=127.0.0.1"]},
        )
    )
    assert (await gateway.get("/metrics")).code == 404
    response = await treq.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert response.code == 200
    assert "agent_active_connections" in await response.text()


@pytest_twisted.ensureDeferred
async def test_api_changes_are_checked_against_the_allowed_origins(tmp_path, agentd):
    gateway = agentd(
        merge(base_config(tmp_path), server={"allowed_origins": ["https://app.example"]})
    )
    body = b'{"key": "sk-ant-0123456789"}'
    json_type = {"Content-Type": "application/json"}
    for origin in ("https://evil.example", f"http://127.0.0.1:{gateway.port}"):
        headers = {**auth(), **json_type, "Origin": origin}
        for method, path in (
            ("PUT", "/api/keys/anthropic"),
            ("DELETE", "/api/keys/anthropic"),
            ("POST", "/api/usage"),
        ):
            response = await treq.request(method, gateway.http + path, headers=headers, data=body)
            assert response.code == 403, (method, origin)
            assert await response.json() == {"error": "origin not allowed"}
    twice = Headers({**auth(), "Origin": ["https://app.example", "https://app.example"]})
    response = await gateway.get("/api/usage", headers=twice)
    assert response.code == 403
    await response.content()
    allowed = {**auth(), **json_type, "Origin": "https://app.example"}
    response = await treq.put(gateway.http + "/api/keys/anthropic", headers=allowed, data=body)
    assert response.code == 204
    await response.content()
