"""The SSH transport: agents started on project VMs, one pool of connections per VM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime

from agentd.transport import AgentProcess, AgentSink, AgentTarget, TransportError
from agentd.transport.ssh.pool import VMPool
from agentd.transport.ssh.settings import SSHSettings


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

    def health(self) -> dict[str, Any]:
        """Failing while the most recent connection attempt to some VM, in the last five
        minutes, failed."""
        now = self._clock.seconds()
        failing = [
            p.vm
            for p in self._pools.values()
            if p.last_failure is not None and now - p.last_failure[0] < 300 and not p.connections
        ]
        return {
            "failing": bool(failing),
            "failing_vms": len(failing),
            "connections": sum(len(p.connections) for p in self._pools.values()),
        }

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
        return defer.ensureDeferred(pool.open(target, sink))

    def stop(self) -> Deferred[None]:
        for pool in self._pools.values():
            pool.close()
        return succeed(None)
