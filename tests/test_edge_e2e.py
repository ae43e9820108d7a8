"""The HTTP edge on real sockets: a real agentd, raw clients from several loopback addresses."""

from __future__ import annotations

import socket
import time

import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from agentd import metrics
from agentd.session.session import SessionKey
from tests.harness import base_config, merge, token
from tests.wsclient import connect

GET_HEALTH = b"GET /health/live HTTP/1.1\r\nHost: agentd\r\n"


async def pause(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def dial(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection from ``source`` (any 127/8 address is this machine's loopback)."""
    client = socket.socket()
    client.bind((source, 0))
    client.connect(("127.0.0.1", port))
    return client


def is_closed(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        client.setblocking(True)


def trickle(client: socket.socket, data: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """Send ``data`` a byte at a time until agentd closes; (seconds until then, its answer)."""
    started = time.monotonic()
    client.settimeout(every)
    answer = b""
    for byte in data:
        if time.monotonic() - started > limit:
            break
        try:
            client.send(bytes([byte]))
            chunk = client.recv(4096)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        answer += chunk
        if not chunk:
            break
    return time.monotonic() - started, answer


def ask(client: socket.socket, request: bytes) -> bytes:
    """One request on a kept-alive connection; the response's head."""
    client.settimeout(5)
    client.sendall(request)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = client.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


@pytest_twisted.ensureDeferred
async def test_a_client_trickling_its_head_is_cut_at_the_head_deadline(tmp_path, agentd):
    gateway = agentd(merge(base_config(tmp_path), server={"request_head_timeout_seconds": 1.0}))
    client = dial(gateway.port)
    try:
        seconds, answer = await threads.deferToThread(trickle, client, GET_HEALTH * 10, 0.1, 5.0)
    finally:
        client.close()
    assert 0.9 <= seconds < 3.0
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")


@pytest_twisted.ensureDeferred
async def test_a_client_trickling_its_body_is_cut_at_the_body_deadline(tmp_path, agentd):
    gateway = agentd(merge(base_config(tmp_path), server={"request_body_timeout_seconds": 1.0}))
    client = dial(gateway.port)
    try:
        client.sendall(
            b"PUT /api/keys/anthropic HTTP/1.1\r\nHost: a\r\ncontent-length: 500\r\n\r\n"
        )
        seconds, answer = await threads.deferToThread(trickle, client, b"x" * 500, 0.1, 5.0)
    finally:
        client.close()
    assert 0.9 <= seconds < 3.0
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")


@pytest_twisted.ensureDeferred
async def test_a_flood_of_idle_connections_leaves_health_and_websockets_reachable(tmp_path, agentd):
    cap = 8
    gateway = agentd(merge(base_config(tmp_path), server={"max_unauthenticated_connections": cap}))
    refused = metrics.CONNECTIONS_LIMITED.labels("total", "refused")._value.get()
    flood = [dial(gateway.port) for _ in range(cap)]
    try:
        await pause(0.3)
        # All of them just arrived: their requests could be on the way, so one more is refused.
        extra = dial(gateway.port)
        await pause(0.3)
        assert is_closed(extra)
        extra.close()
        assert not any(is_closed(c) for c in flood)
        assert metrics.CONNECTIONS_LIMITED.labels("total", "refused")._value.get() == refused + 1
        await pause(1.0)
        # Now they have waited a second without a request: the oldest make room.
        response = await treq.get(gateway.http + "/health/live", persistent=False)
        assert response.code == 200
        await pause(0.2)
        flood.append(dial(gateway.port))  # back at the cap once the health check has gone
        await pause(0.2)
        client = await connect(gateway.ws_url(token=token()))
        assert (await client.recv())["type"] == "session"
        client.close()
        await client.closed
        assert sum(is_closed(c) for c in flood) == 2
        assert is_closed(flood[0]) and is_closed(flood[1])
    finally:
        for c in flood:
            c.close()


@pytest_twisted.ensureDeferred
async def test_the_per_address_cap_closes_one_address_extra_connections(tmp_path, agentd):
    gateway = agentd(merge(base_config(tmp_path), server={"max_unauthenticated_per_address": 3}))
    held = [dial(gateway.port, "127.0.0.2") for _ in range(3)]
    try:
        await pause(0.3)
        extra = dial(gateway.port, "127.0.0.2")
        await pause(0.3)
        assert is_closed(extra)
        extra.close()
        other = dial(gateway.port, "127.0.0.3")
        answer = await threads.deferToThread(ask, other, GET_HEALTH + b"\r\n")
        other.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert not any(is_closed(c) for c in held)
    finally:
        for c in held:
            c.close()


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_the_cap_and_the_peer_follow_the_header(tmp_path, agentd):
    gateway = agentd(
        merge(
            base_config(tmp_path),
            server={
                "max_unauthenticated_per_address": 2,
                "trusted_proxies": ["127.0.0.1"],
                "client_address_header": "X-Forwarded-For",
            },
        )
    )
    via_proxy = GET_HEALTH + b"X-Forwarded-For: %s\r\n\r\n"
    proxied = [dial(gateway.port) for _ in range(4)]
    spoofing = [dial(gateway.port, "127.0.0.2") for _ in range(2)]
    try:
        answers = []
        for client, forwarded in zip(
            proxied, [b"203.0.113.9", b"203.0.113.9", b"203.0.113.9", b"203.0.113.10"]
        ):
            answers.append(await threads.deferToThread(ask, client, via_proxy % forwarded))
        assert [a[:12] for a in answers] == [b"HTTP/1.1 200"] * 2 + [
            b"HTTP/1.1 429",
            b"HTTP/1.1 200",
        ]
        # A peer that is no trusted proxy is counted by its own address, whatever it claims.
        for client, forwarded in zip(spoofing, [b"198.51.100.1", b"198.51.100.2"]):
            answer = await threads.deferToThread(ask, client, via_proxy % forwarded)
            assert answer.startswith(b"HTTP/1.1 200")
        spoofing.append(dial(gateway.port, "127.0.0.2"))
        await pause(0.3)
        assert [is_closed(c) for c in spoofing] == [False, False, True]
        # The gateway sees the client the proxy names.
        client = await connect(
            gateway.ws_url(token=token()), headers={"X-Forwarded-For": "198.51.100.7"}
        )
        assert (await client.recv())["type"] == "session"
        session = gateway.registry.by_key[SessionKey("demo", "alice", "echo")]
        assert session.client.context.peer == "198.51.100.7"
        client.close()
        await client.closed
    finally:
        for c in proxied + spoofing:
            c.close()
