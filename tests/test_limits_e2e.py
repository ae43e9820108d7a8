"""Rate limits as a client meets them, through a real agentd on real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from tests.harness import base_config, merge, token
from tests.samples import sample
from tests.servers import SshServer
from tests.wsclient import connect, handshake_headers


class CountingVM(Factory):
    """Stands in for a VM's sshd: counts every TCP connection agentd makes, then hangs up.

    No connection ever becomes an SSH session, so nothing is pooled: every attempt to reach
    the VM is one more accept here.
    """

    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr: object) -> Protocol:
        self.accepted += 1
        return _HangUp()


class _HangUp(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


@pytest.fixture
def counting_vm() -> Iterator[tuple[CountingVM, int]]:
    vm = CountingVM()
    port: IListeningPort = reactor.listenTCP(0, vm, interface="127.0.0.1")
    try:
        yield vm, port.getHost().port
    finally:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_handshake_flood_gets_429_with_retry_after_before_any_ssh_work(
    tmp_path, counting_vm, redis_server, agentd
):
    vm, vm_port = counting_vm
    keys = SshServer(tmp_path / "vm")  # never started: its client key and known_hosts only
    gateway = agentd(
        merge(
            base_config(tmp_path),
            vms=keys.vms_section(port=vm_port, connect_attempts=1, connect_timeout_seconds=5.0),
            redis={"url": redis_server.url, "timeout_ms": 500},
            ratelimit={"connections_per_minute": 3},
        )
    )
    # An admitted connection's prompt does reach the VM: the count sees SSH work.
    first = await connect(gateway.ws_url(token=token("flood")))
    assert (await first.recv())["type"] == "session"
    first.send({"type": "prompt", "id": "p", "text": "hi"})
    assert (await first.recv_until("error"))[-1]["code"] == "vm_unavailable"
    assert vm.accepted == 1
    first.close()
    await first.closed
    for _ in range(2):
        client = await connect(gateway.ws_url(token=token("flood")))
        client.close()
    created = sample("agentd_session_events_total", event="created")
    url = gateway.http + "/projects/demo/agent/echo"
    for _ in range(2):
        response = await treq.get(
            url, params={"token": token("flood")}, headers=handshake_headers()
        )
        assert response.code == 429
        retry_after = int(response.headers.getRawHeaders("retry-after")[0])
        assert 1 <= retry_after <= 60
        await response.content()
    # Refused before any session existed that could reach the VM, and nothing dialled it.
    assert sample("agentd_session_events_total", event="created") == created
    assert vm.accepted == 1
    other = await connect(gateway.ws_url(token=token("someone-else")))
    assert (await other.recv())["type"] == "session"
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
    # Starting the agent can outlast the 1 s window on a busy machine; once it runs, the
    # window starts afresh, and the two quick prompts below fall well inside it.
    client.send({"type": "prompt", "id": "warm", "text": "start the agent"})
    await client.recv_until("done")
    redis_server.cli("del", "rl:{limited}:prompts")  # if it has not expired already
    for i in range(2):
        client.send({"type": "prompt", "id": f"p{i}", "text": "ok"})
        await client.recv_until("done")
    client.send({"type": "prompt", "id": "p2", "text": "too soon"})
    error = (await client.recv_until("error"))[-1]
    assert error["code"] == "rate_limit" and error["id"] == "p2"
    assert (error["policy"], error["limit"], error["window"]) == ("prompts", 2, 1000)
    assert 0 < error["retryAfter"] <= 1000
    # Waiting out retryAfter is the behaviour under test: then the prompt is accepted.
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
