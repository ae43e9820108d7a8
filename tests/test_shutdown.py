"""Graceful shutdown: not ready at once, clients told to resume elsewhere, agents run on."""

from __future__ import annotations

import time

import pytest_twisted
import treq
from twisted.internet import defer

from tests.harness import base_config, merge, token
from tests.servers import holder_pids
from tests.wsclient import connect, handshake_headers


@pytest_twisted.ensureDeferred
async def test_a_stop_closes_clients_with_1012_and_another_agentd_resumes_the_answer(
    tmp_path, agentd
):
    config = merge(base_config(tmp_path), server={"drain_seconds": 10.0})
    gateway = agentd(config)
    client = await connect(gateway.ws_url(token=token()))
    hello = await client.recv()
    # About two seconds of streaming still to come when the stop begins.
    client.send(
        {
            "type": "prompt",
            "id": "slow",
            "text": "a b c d e",
            "options": {"repeat": 20, "delay_ms": 20},
        }
    )
    seen = await client.recv_until("start")
    last_seq = seen[-1]["seq"]
    holders = holder_pids(tmp_path / "sessions")
    started = time.monotonic()
    stopping = defer.ensureDeferred(gateway.service.stopService())
    assert not gateway.service.ready()
    code, _ = await client.closed
    assert code == 1012
    await stopping
    assert time.monotonic() - started < 3, "the stop waited for the running query"
    assert gateway.registry.by_id == {}
    assert holder_pids(tmp_path / "sessions") == holders, "the agent did not outlive agentd"

    successor = agentd(merge(base_config(tmp_path), server={"drain_seconds": 10.0}))
    resumed = await connect(
        successor.ws_url(token=token(), session=hello["session"], last_seq=last_seq)
    )
    again = await resumed.recv()
    assert again["resumed"] is True and again["session"] == hello["session"]
    rest = await resumed.recv_until("done")
    assert [m["seq"] for m in rest] == list(range(last_seq + 1, rest[-1]["seq"] + 1))
    text = "".join(m["text"] for m in seen + rest if m["type"] == "delta")
    assert text == "a b c d e" * 20


@pytest_twisted.ensureDeferred
async def test_while_draining_readiness_and_upgrades_answer_503(tmp_path, agentd):
    gateway = agentd(base_config(tmp_path))
    # The state a stop is in until its attaches have let go (milliseconds, usually).
    gateway.service.draining = True
    ready = await treq.get(gateway.http + "/health/ready")
    assert ready.code == 503
    refused = await treq.get(
        gateway.http + "/projects/demo/agent/echo",
        params={"token": token()},
        headers=handshake_headers(),
    )
    assert refused.code == 503 and refused.headers.getRawHeaders("retry-after")
    gateway.service.draining = False
