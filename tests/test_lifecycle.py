"""Stopping and SIGTERM: the drain, its poll and deadline, and a second SIGTERM, on a Clock.

The signal handler is driven directly with an injected reactor; no signal is sent.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from agentd import config as config_module
from agentd.lifecycle import DRAIN_POLL_SECONDS, AgentdService


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
        self.queries = 1
        self.closed: list[int] = []

    def busy(self) -> int:
        return self.queries

    def close_all(self, code: int, reason: str) -> None:
        self.closed.append(code)

    def end_all(self) -> Deferred[None]:
        return succeed(None)


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


def test_first_sigterm_starts_the_drain_and_a_second_cuts_it_short() -> None:
    agentd, reactor, registry = service(drain_seconds=30.0)
    assert agentd.ready()
    agentd.sigterm(signal.SIGTERM, None)
    assert agentd.draining and not agentd.ready()
    assert registry.closed == [1001]
    reactor.advance(10)
    assert not stopped(reactor), "the drain ended while a query was still running"
    agentd.sigterm(signal.SIGTERM, None)
    assert stopped(reactor)
    assert not agentd.running


def test_the_drain_ends_at_the_first_poll_after_the_last_query() -> None:
    agentd, reactor, registry = service(drain_seconds=30.0)
    agentd.sigterm(signal.SIGTERM, None)
    reactor.advance(3 * DRAIN_POLL_SECONDS)
    assert not stopped(reactor)
    registry.queries = 0
    assert not stopped(reactor)
    reactor.advance(DRAIN_POLL_SECONDS)
    assert stopped(reactor)
    assert reactor.getDelayedCalls() == []


def test_the_drain_ends_at_its_deadline_when_queries_still_run() -> None:
    agentd, reactor, _ = service(drain_seconds=5.0)
    agentd.sigterm(signal.SIGTERM, None)
    reactor.pump([DRAIN_POLL_SECONDS] * 49)
    assert not stopped(reactor)
    reactor.pump([DRAIN_POLL_SECONDS] * 2)
    assert stopped(reactor)


def test_a_sigterm_after_the_drain_does_nothing_more() -> None:
    agentd, reactor, registry = service(drain_seconds=30.0)
    registry.queries = 0
    agentd.sigterm(signal.SIGTERM, None)
    assert stopped(reactor)
    agentd.sigterm(signal.SIGTERM, None)
    assert registry.closed == [1001]
