"""Rate limits as a client meets them, through a real agentd on real Redis."""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from agentd import metrics
from tests.harness import base_config, merge, ssh_config, token
from tests.wsclient import connect, handshake_headers


@pytest_twisted.ensureDeferred
async def test_handshake_flood_gets_429_with_retry_after_before_any_ssh_work(
    tmp_path, sshd, redis_server, agentd
):
    gateway = agentd(
        merge(
            ssh_config(tmp_path, sshd),
            redis={"url": redis_server.url, "timeout_ms": 500},
            ratelimit={"connections_per_minute": 3},
        )
    )
    attempts = metrics.SSH_CONNECT_ATTEMPTS._value.get()
    url = gateway.http + "/projects/demo/agent/echo"
    for _ in range(3):
        client = await connect(gateway.ws_url(token=token("flood")))
        client.close()
    for _ in range(2):
        response = await treq.get(
            url, params={"token": token("flood")}, headers=handshake_headers()
        )
        assert response.code == 429
        retry_after = int(response.headers.getRawHeaders("retry-after")[0])
        assert 1 <= retry_after <= 60
    assert metrics.SSH_CONNECT_ATTEMPTS._value.get() == attempts
    other = await connect(gateway.ws_url(token=token("someone-else")))
    other.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_sessions_per_user_are_capped(tmp_path, agentd):
    gateway = agentd(
        merge(
            base_config(tmp_path),
            ratelimit={"max_sessions_per_user": 2},
            sessions={"grace_seconds": 30.0},
        )
    )
    tok = token("busy", projects=["*"])
    first = await connect(gateway.ws_url("p1", token=tok))
    second = await connect(gateway.ws_url("p2", token=tok))
    response = await treq.get(
        gateway.http + "/projects/p3/agent/echo", params={"token": tok}, headers=handshake_headers()
    )
    assert response.code == 429 and response.headers.getRawHeaders("retry-after")
    # Reconnecting to an existing (project, user, agent) is not a new session.
    again = await connect(gateway.ws_url("p1", token=tok))
    for client in (first, second, again):
        client.close()


@pytest_twisted.ensureDeferred
async def test_prompt_limit_answers_rate_limit_with_an_exact_retry_after(
    tmp_path, redis_server, agentd
):
    gateway = agentd(
        merge(
            base_config(tmp_path),
            redis={"url": redis_server.url, "timeout_ms": 500},
            ratelimit={"prompts_per_minute": 2, "window_seconds": 1.0},
        )
    )
    client = await connect(gateway.ws_url(token=token("limited")))
    await client.recv()
    for i in range(2):
        client.send({"type": "prompt", "id": f"p{i}", "text": "ok"})
        await client.recv_until("done")
    client.send({"type": "prompt", "id": "p2", "text": "too soon"})
    error = (await client.recv_until("error"))[-1]
    assert error["code"] == "rate_limit" and error["id"] == "p2"
    assert (error["policy"], error["limit"], error["window"]) == ("prompts", 2, 1000)
    assert 0 < error["retryAfter"] <= 1000
    await deferLater(reactor, error["retryAfter"] / 1000 + 0.05, lambda: None)
    client.send({"type": "prompt", "id": "p2", "text": "now"})
    messages = await client.recv_until("done")
    assert messages[0]["type"] == "ack" and messages[0]["id"] == "p2"
    client.close()


@pytest_twisted.ensureDeferred
async def test_only_upgrades_that_pass_every_check_spend_the_handshake_budget(
    tmp_path, redis_server, agentd
):
    gateway = agentd(
        merge(
            base_config(tmp_path),
            server={"allowed_origins": ["https://app.example"]},
            redis={"url": redis_server.url, "timeout_ms": 500},
            ratelimit={"connections_per_minute": 3},
        )
    )
    cookie = {"Cookie": f"agentd_token={token('cookie')}"}
    route = gateway.http + "/projects/demo/agent/echo"
    for _ in range(30):
        plain = await treq.get(route, headers=cookie)
        assert plain.code == 426
        await plain.content()
    for method in ("POST", "HEAD"):
        other = await treq.request(method, route, headers={**cookie, **handshake_headers()})
        assert other.code == 426
        await other.content()
    evil = {**cookie, **handshake_headers(), "Origin": "https://evil.example"}
    cross_site = await treq.get(route, headers=evil)
    assert cross_site.code == 403
    await cross_site.content()
    for _ in range(3):
        client = await connect(
            gateway.ws_url(), headers={**cookie, "Origin": "https://app.example"}
        )
        assert (await client.recv())["type"] == "session"
        client.close()
        await client.closed
    over = await treq.get(route, headers={**cookie, **handshake_headers()})
    assert over.code == 429
    await over.content()
