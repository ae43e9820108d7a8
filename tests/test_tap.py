"""What ``build`` wires from a configuration: its listeners and its health checks.

Built on a MemoryReactorClock, so nothing listens or connects for real: the reactor records
what would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource
from twisted.web.server import Site

from agentd import config as config_module
from agentd.health import HealthResource
from agentd.lifecycle import AgentdService
from agentd.redisgate import RedisPromptLimits
from agentd.session.gate import PromptLimits
from agentd.tap import build
from tests.harness import SECRET, merge
from tests.servers import keygen

LISTEN = "tcp:18080:interface=127.0.0.2:backlog=1024"


def local_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "server": {"listen": [LISTEN]},
        "auth": {"jwt_secret": SECRET},
        "usage": {"spool_dir": str(tmp_path / "spool")},
    }


def ssh_config(tmp_path: Path) -> dict[str, Any]:
    key = keygen(tmp_path / "id_ed25519")
    known_hosts = tmp_path / "known_hosts"
    host = (tmp_path / "id_ed25519.pub").read_text().split()
    known_hosts.write_text(f"[127.0.0.1]:2222 {host[0]} {host[1]}\n")
    vms = {"transport": "ssh", "private_key": str(key), "known_hosts": str(known_hosts)}
    return merge(local_config(tmp_path), vms=vms)


def built(config: dict[str, Any]) -> tuple[AgentdService, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    service = build(config_module.from_dict(config, env={}, source="test"), reactor)
    return service, reactor


def children(site: Any) -> set[bytes]:
    assert isinstance(site, Site)
    root: Resource = site.resource
    return set(root.children)


def health_of(site: Any) -> HealthResource:
    health = site.resource.children[b"health"]
    assert isinstance(health, HealthResource)
    return health


@pytest.mark.parametrize(
    ("name", "make_config", "redis", "checks"),
    [
        ("local, memory", local_config, "", ["usage", "ratelimit"]),
        ("ssh, memory", ssh_config, "", ["usage", "ratelimit", "ssh"]),
        ("local, redis", local_config, "redis://127.0.0.1:1/0", ["redis", "usage", "ratelimit"]),
        ("ssh, redis", ssh_config, "redis://127.0.0.1:1/0", ["redis", "usage", "ratelimit", "ssh"]),
    ],
)
def test_build_wires_one_site_on_the_configured_endpoint_with_each_parts_health_check(
    tmp_path: Path, name: str, make_config: Any, redis: str, checks: list[str]
) -> None:
    config = make_config(tmp_path)
    if redis:
        config = merge(config, redis={"url": redis})
    service, reactor = built(config)
    assert reactor.tcpClients == [], "building connected to something"
    assert reactor.tcpServers == [], "building listened before the service started"
    service.startService()
    try:
        [(port, site, backlog, interface)] = reactor.tcpServers
        assert (port, backlog, interface) == (18080, 1024, "127.0.0.2")
        assert {b"projects", b"health", b"metrics", b"api"} <= children(site)
        assert [check.name for check in health_of(site).checks] == checks
    finally:
        service.stopService()
        reactor.advance(60)


def test_metrics_listen_gets_its_own_site_and_leaves_the_main_one(tmp_path: Path) -> None:
    config = merge(
        local_config(tmp_path),
        server={
            "listen": [LISTEN, "tcp:18081"],
            "metrics_listen": ["tcp:19090:interface=127.0.0.3"],
        },
    )
    service, reactor = built(config)
    service.startService()
    try:
        main, second, metrics = reactor.tcpServers
        assert (main[0], main[2], main[3]) == (18080, 1024, "127.0.0.2")
        # Twisted's defaults where the endpoint string names none.
        assert (second[0], second[2], second[3]) == (18081, 50, "")
        assert second[1] is main[1], "every listen endpoint serves the same Site"
        assert (metrics[0], metrics[3]) == (19090, "127.0.0.3")
        assert children(metrics[1]) == {b"metrics"}
        assert b"metrics" not in children(main[1])
    finally:
        service.stopService()
        reactor.advance(60)


@pytest.mark.parametrize(
    ("redis", "gate"), [("", PromptLimits), ("redis://127.0.0.1:1/0", RedisPromptLimits)]
)
def test_build_decides_prompts_in_one_redis_trip_only_when_redis_is_configured(
    tmp_path: Path, redis: str, gate: type
) -> None:
    config = local_config(tmp_path)
    if redis:
        config = merge(config, redis={"url": redis})
    service, _ = built(config)
    assert type(service.registry.services.gate) is gate
