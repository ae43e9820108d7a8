"""Graceful shutdown: not ready at once, clients told to go elsewhere, queries finish."""

from __future__ import annotations

import time

import pytest_twisted
import treq
from twisted.internet import defer

from tests.harness import base_config, merge, token
from tests.samples import sample
from tests.wsclient import connect, handshake_headers


@pytest_twisted.ensureDeferred
async def test_stop_drains_running_queries_before_ending_agents(tmp_path, agentd):
    gateway = agentd(merge(base_config(tmp_path), server={"drain_seconds": 10.0}))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    # About a second of streaming still to come when the stop begins.
    client.send(
        {
            "type": "prompt",
            "id": "slow",
            "text": "a b c d e",
            "options": {"repeat": 10, "delay_ms": 20},
        }
    )
    await client.recv_until("start")
    done_before = sample("agentd_queries_total", agent="echo", outcome="done")
    started = time.monotonic()
    stopping = defer.ensureDeferred(gateway.service.stopService())
    code, _ = await client.closed
    assert code == 1001
    ready = await treq.get(gateway.http + "/health/ready")
    assert ready.code == 503
    refused = await treq.get(
        gateway.http + "/projects/demo/agent/echo",
        params={"token": token()},
        headers=handshake_headers(),
    )
    assert refused.code == 503 and refused.headers.getRawHeaders("retry-after")
    await stopping
    elapsed = time.monotonic() - started
    assert sample("agentd_queries_total", agent="echo", outcome="done") == done_before + 1
    assert elapsed < 10, "the drain waited for its timeout instead of the query"
    assert gateway.registry.by_id == {}
