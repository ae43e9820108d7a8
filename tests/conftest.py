from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from twisted.logger import LogEvent, globalLogPublisher

from tests.servers import RedisServer, SshServer, kill_holders

if TYPE_CHECKING:
    from tests.harness import RunningAgentd


@pytest.fixture(autouse=True)
def _no_holder_outlives_its_test(tmp_path: Path) -> Iterator[None]:
    """Session holders outlive agentd by design: every one a test started under its
    temporary directory is ended when the test ends."""
    yield
    kill_holders(tmp_path)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every log event while the test runs."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test; the test may stop, kill or restart it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    """A real OpenSSH sshd on a loopback port, configured from vm-image/sshd_config."""
    server = SshServer(tmp_path / "sshd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def agentd() -> Iterator[Callable[[dict[str, Any]], RunningAgentd]]:
    """Start agentd from a config dict in the test's reactor; stopped after the test."""
    from tests.harness import start

    running: list[RunningAgentd] = []

    def start_agentd(config: dict[str, Any]) -> RunningAgentd:
        instance = start(config)
        running.append(instance)
        return instance

    yield start_agentd
    for instance in running:
        if instance.service.running:
            pytest_twisted.blockon(instance.service.stopService())
