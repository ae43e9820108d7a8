"""Stopping and SIGTERM: clients told to resume elsewhere, attaches let go, on a Clock.

The signal handler is driven directly with an injected reactor; no signal is sent.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from agentd import config as config_module
from agentd.lifecycle import RESTARTING, AgentdService


class Reactor(MemoryReactorClock):
    """A reactor whose stop stops the service, as twistd's does."""

    def __init__(self) -> None:
        super().__init__()
        self.service: AgentdService | None = None
        self.stopping: Deferred[None] | None = None

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def stop(self) -> None:
        assert self.service is not None
        self.stopping = self.service.stopService()


class Registry:
    def __init__(self) -> None:
        self.closed: list[int] = []
        self.left: Deferred[None] = Deferred()
        self.leaving = 0

    def close_all(self, code: int, reason: str) -> None:
        self.closed.append(code)

    def leave_all(self) -> Deferred[None]:
        self.leaving += 1
        return self.left


class Part:
    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)


def service(drain_seconds: float = 30.0) -> tuple[AgentdService, Reactor, Registry]:
    config = config_module.from_dict(
        {"server": {"drain_seconds": drain_seconds}}, env={}, source="test"
    )
    reactor, registry, part = Reactor(), Registry(), Part()
    agentd = AgentdService(config, reactor, reactor, registry, part, part, part, None)
    reactor.service = agentd
    agentd.startService()
    return agentd, reactor, registry


def stopped(reactor: Reactor) -> bool:
    assert reactor.stopping is not None
    return reactor.stopping.called


def test_sigterm_handler_is_installed_through_the_injected_reactor() -> None:
    config = config_module.from_dict({}, env={}, source="test")
    reactor, part = Reactor(), Part()
    agentd = AgentdService(config, reactor, reactor, Registry(), part, part, part, None)
    agentd.handle_signals = True
    agentd.startService()
    assert (signal.signal, (signal.SIGTERM, agentd.sigterm), {}) in reactor.whenRunningHooks


def test_sigterm_closes_clients_with_1012_and_stops_once_the_attaches_let_go() -> None:
    agentd, reactor, registry = service(drain_seconds=30.0)
    assert agentd.ready()
    agentd.sigterm(signal.SIGTERM, None)
    assert agentd.draining and not agentd.ready()
    assert registry.closed == [RESTARTING] and registry.leaving == 1
    reactor.advance(1)
    assert not stopped(reactor)
    registry.left.callback(None)
    assert stopped(reactor)
    assert not agentd.running
    assert reactor.getDelayedCalls() == []


def test_an_attach_that_does_not_exit_delays_the_stop_by_drain_seconds_at_most() -> None:
    agentd, reactor, _ = service(drain_seconds=5.0)
    agentd.sigterm(signal.SIGTERM, None)
    reactor.advance(4.9)
    assert not stopped(reactor)
    reactor.advance(0.2)
    assert stopped(reactor)


def test_a_second_sigterm_does_nothing_more() -> None:
    agentd, reactor, registry = service(drain_seconds=30.0)
    registry.left.callback(None)
    agentd.sigterm(signal.SIGTERM, None)
    assert stopped(reactor)
    agentd.sigterm(signal.SIGTERM, None)
    assert registry.closed == [RESTARTING] and registry.leaving == 1
