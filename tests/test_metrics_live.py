"""A live agentd over real sshd and Redis: counters move by exactly what happened, health
follows Redis, and everything the dashboard and alerts query is really exported."""

from __future__ import annotations

from typing import Any

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.harness import merge, ssh_config, token
from tests.test_monitoring_kit import (
    agentd_names,
    alert_rules,
    dashboard,
    dashboard_expressions,
    metric_names,
)
from tests.wsclient import connect


async def scrape(gateway: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await treq.get(gateway.http + "/metrics")
    assert response.code == 200
    text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def health(gateway: Any) -> tuple[int, dict[str, Any]]:
    response = await treq.get(gateway.http + "/health")
    return response.code, await response.json()


@pytest_twisted.ensureDeferred
async def test_counters_move_by_exactly_what_happened(tmp_path, sshd, redis_server, agentd):
    config = merge(
        ssh_config(tmp_path, sshd),
        redis={"url": redis_server.url, "timeout_ms": 500},
        ratelimit={"prompts_per_minute": 3},
    )
    gateway = agentd(config)
    before = await scrape(gateway)
    client = await connect(gateway.ws_url(token=token("metrics-user")))
    await client.recv()
    client.protocol.sendMessage(b"not json", isBinary=False)
    await client.recv()
    for i in range(4):
        client.send({"type": "prompt", "id": f"p{i}", "text": f"prompt number {i}"})
        await client.recv_until("done" if i < 3 else "error")
    client.close()
    await client.closed
    expected_input_tokens = sum(len(f"prompt number {i}".split()) for i in range(3))
    for _ in range(50):  # usage is recorded just after the done is forwarded
        after = await scrape(gateway)
        if (
            value(after, "agentd_tokens_total", agent="echo", type="input")
            - value(before, "agentd_tokens_total", agent="echo", type="input")
            >= expected_input_tokens
        ):
            break
        await deferLater(reactor, 0.05, lambda: None)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("agentd_queries_total", agent="echo", outcome="done") == 3
    assert moved("agent_query_duration_seconds_count", agent="echo") == 3
    assert moved("agent_errors_total", agent="echo", error_type="rate_limit") == 1
    assert moved("agent_errors_total", agent="echo", error_type="bad_request") == 1
    assert moved("agentd_ratelimit_decisions_total", policy="prompts", result="allowed") == 3
    assert moved("agentd_ratelimit_decisions_total", policy="prompts", result="rejected") == 1
    frames = client.raw[1:]  # everything after the session greeting carries a seq
    assert moved("agentd_messages_total", direction="to_client") == len(frames)
    assert moved("agentd_bytes_total", direction="to_client") == sum(len(f) for f in frames)
    assert moved("agentd_messages_total", direction="to_agent") == 3
    assert moved("agentd_ssh_connect_attempts_total") == 1
    assert moved("agentd_tokens_total", agent="echo", type="input") == expected_input_tokens
    assert moved("agentd_usage_events_total", result="recorded") == 3


@pytest_twisted.ensureDeferred
async def test_health_is_degraded_while_redis_is_down_and_healthy_when_it_returns(
    tmp_path, redis_server, agentd
):
    from tests.harness import base_config

    gateway = agentd(merge(base_config(tmp_path), redis={"url": redis_server.url}))
    code, body = await health(gateway)
    assert (code, body["status"]) == (200, "healthy"), body
    redis_server.stop()
    code, body = await health(gateway)
    assert (code, body["status"]) == (200, "degraded")
    assert body["checks"]["redis"]["status"] == "failed"
    redis_server.start()
    for _ in range(50):
        code, body = await health(gateway)
        if body["status"] == "healthy":
            break
        await deferLater(reactor, 0.2, lambda: None)
    assert body["status"] == "healthy", body
    ready = await treq.get(gateway.http + "/health/ready")
    assert ready.code == 200


@pytest_twisted.ensureDeferred
async def test_every_metric_the_dashboard_and_alerts_query_is_exported_live(
    tmp_path, sshd, redis_server, agentd
):
    gateway = agentd(merge(ssh_config(tmp_path, sshd), redis={"url": redis_server.url}))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": "p", "text": "fill the histograms"})
    await client.recv_until("done")
    client.close()
    exported = {name for name, _ in await scrape(gateway)}
    referenced: set[str] = set()
    for expr in dashboard_expressions(dashboard()):
        referenced |= metric_names(expr)
    for rule in alert_rules():
        referenced |= metric_names(rule["expr"])
    missing = sorted(agentd_names(referenced) - exported)
    assert not missing, f"queried but not exported by a running agentd: {missing}"
