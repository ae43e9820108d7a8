"""Sessions share pooled SSH connections and spill onto new ones when sshd refuses channels."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import defer

from tests.harness import merge, ssh_config, token
from tests.samples import sample
from tests.servers import SshServer
from tests.wsclient import connect


async def one_session(gateway, user: str) -> list[dict]:
    client = await connect(gateway.ws_url(token=token(user)))
    await client.recv()
    client.send(
        {"type": "prompt", "id": "p", "text": f"hello {user}", "options": {"delay_ms": 300}}
    )
    await client.recv_until("start")
    return client


@pytest_twisted.ensureDeferred
async def test_a_refused_channel_opens_another_connection_instead_of_failing(tmp_path, agentd):
    sshd = SshServer(tmp_path / "sshd", max_sessions=2)
    sshd.start()
    try:
        # agentd believes 10 channels fit on a connection; this sshd allows only 2.
        gateway = agentd(merge(ssh_config(tmp_path, sshd), vms={"max_channels_per_connection": 10}))
        before = sample("agentd_ssh_connect_attempts_total")
        clients = await defer.gatherResults(
            [defer.ensureDeferred(one_session(gateway, f"user{i}")) for i in range(6)]
        )
        for i, client in enumerate(clients):
            messages = await client.recv_until("done")
            text = "".join(m["text"] for m in messages if m["type"] == "delta")
            assert text == f"hello user{i}"
            client.close()
        assert sample("agentd_ssh_connect_attempts_total") - before >= 3
    finally:
        sshd.stop()


@pytest_twisted.ensureDeferred
async def test_sessions_on_one_vm_share_a_connection(tmp_path, sshd, agentd):
    gateway = agentd(ssh_config(tmp_path, sshd))
    before = sample("agentd_ssh_connect_attempts_total")
    clients = await defer.gatherResults(
        [defer.ensureDeferred(one_session(gateway, f"user{i}")) for i in range(5)]
    )
    for client in clients:
        await client.recv_until("done")
        client.close()
    assert sample("agentd_ssh_connect_attempts_total") - before == 1


@pytest_twisted.ensureDeferred
async def test_the_connection_sends_small_messages_at_once(tmp_path, sshd, agentd):
    gateway = agentd(ssh_config(tmp_path, sshd))
    client = await one_session(gateway, "nagle")
    await client.recv_until("done")
    (pool,) = gateway.service.transport._pools.values()
    (connection,) = pool._transports.values()
    tcp = connection.transport.getHandle()
    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert connection._socket is tcp, "each read is acknowledged at once"
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_dropped_vm_connection_is_reconnected_and_the_answers_arrive_without_a_gap(
    tmp_path, sshd, agentd
):
    gateway = agentd(ssh_config(tmp_path, sshd))
    clients = await defer.gatherResults(
        [defer.ensureDeferred(one_session(gateway, f"user{i}")) for i in range(2)]
    )
    (pool,) = gateway.service.transport._pools.values()
    (connection,) = pool._transports.values()
    before = sample("agentd_ssh_connect_attempts_total")
    connection.transport.abortConnection()  # the network between agentd and the VM dies
    for i, client in enumerate(clients):
        messages = await client.recv_until("done")
        assert not [m for m in messages if m["type"] == "error"], "the agent did not end"
        assert [m["seq"] for m in messages] == list(range(3, 3 + len(messages)))
        text = "".join(m["text"] for m in messages if m["type"] == "delta")
        assert text == f"hello user{i}"
    assert sample("agentd_ssh_connect_attempts_total") == before + 1, "one connection for both"
    clients[0].send({"type": "prompt", "id": "again", "text": "still here"})
    messages = await clients[0].recv_until("done")
    assert "".join(m["text"] for m in messages if m["type"] == "delta") == "still here"
    for client in clients:
        client.close()
