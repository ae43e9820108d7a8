"""The SSH transport: sessions attached on project VMs, one pool of connections per VM."""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime

from agentd.config import Config
from agentd.health import CheckResult, HealthCheck
from agentd.transport import (
    NUMBERING_ROOM,
    AgentProcess,
    AgentSink,
    AgentTarget,
    AttachCommand,
    TransportError,
    attach,
    forwarded_env,
)
from agentd.transport.ssh.known_hosts import KnownHosts
from agentd.transport.ssh.pool import VMPool
from agentd.transport.ssh.settings import SSHSettings, load_private_key


class SSHTransport:
    """Starts agents on project VMs over SSH with key auth and strict host-key checking."""

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        settings: SSHSettings,
        host_for: Callable[[str], str],
        port: int,
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._settings = settings
        self._host_for = host_for
        self._port = port
        self._pools: dict[tuple[str, int], VMPool] = {}

    @classmethod
    def from_config(cls, config: Config, reactor: IReactorTCP) -> SSHTransport:
        """The transport ``[vms]`` describes; reads the private key now, so a bad one stops
        agentd at start, not at the first prompt."""
        v = config.vms
        settings = SSHSettings(
            user=v.user,
            private_key=load_private_key(v.private_key),
            known_hosts=KnownHosts(v.known_hosts),
            attach=AttachCommand.from_config(config),
            forward_env=forwarded_env(v.forward_env, os.environ),
            connect_timeout=v.connect_timeout_seconds,
            connect_attempts=v.connect_attempts,
            backoff_base=v.connect_backoff_base_seconds,
            backoff_cap=v.connect_backoff_cap_seconds,
            max_channels=v.max_channels_per_connection,
            max_line=config.server.max_message_bytes + NUMBERING_ROOM,
        )
        hosts = dict(v.hosts)

        def host_for(project: str) -> str:
            return hosts.get(project) or v.host.format(project=project)

        return cls(reactor, IReactorTime(reactor), settings, host_for, v.port)

    def health_checks(self) -> list[HealthCheck]:
        return [HealthCheck("ssh", self._health)]

    def _health(self) -> CheckResult:
        """Degraded while the most recent connection attempt to some VM, in the last five
        minutes, failed."""
        now = self._clock.seconds()
        failing = [
            p.vm
            for p in self._pools.values()
            if p.last_failure is not None and now - p.last_failure[0] < 300 and not p.connections
        ]
        detail = {
            "failing": bool(failing),
            "failing_vms": len(failing),
            "connections": sum(len(p.connections) for p in self._pools.values()),
        }
        return CheckResult("degraded" if failing else "ok", detail)

    def pool(self, project: str) -> VMPool:
        host = self._host_for(project)
        key = (host, self._port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = VMPool(
                host, self._port, self._settings, self._reactor, self._clock
            )
        return pool

    def spawn(self, target: AgentTarget, sink: AgentSink) -> Deferred[AgentProcess]:
        try:
            pool = self.pool(target.project)
        except (KeyError, ValueError) as e:
            return fail(TransportError("unreachable", str(e)))
        return Deferred.fromCoroutine(attach(pool, target, sink))

    def stop(self) -> Deferred[None]:
        for pool in self._pools.values():
            pool.close()
        return succeed(None)
