"""Accept backoff: a port out of descriptors pauses, backs off, logs once per episode."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import twisted.test
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from agentd import metrics
from agentd.listen import (
    LONGEST_PAUSE_SECONDS,
    AcceptBackoff,
    BackoffEndpoint,
    _BackoffSocket,
)

TEST_PEM = Path(twisted.test.__file__).parent / "server.pem"


class FakePort:
    connected = True
    disconnecting = False

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class FailingSocket:
    """accept() fails with ``error`` while ``failing``; then it returns the ``waiting``
    connections and reports EAGAIN once they are gone."""

    def __init__(self, error: int) -> None:
        self.error = error
        self.failing = True
        self.waiting = 0

    def accept(self) -> tuple[Any, Any]:
        if self.failing:
            raise OSError(self.error, "fails")
        if not self.waiting:
            raise BlockingIOError(errno.EAGAIN, "no connection waiting")
        self.waiting -= 1
        return object(), ("127.0.0.1", 1)


def messages(events: list[LogEvent]) -> list[str]:
    return [e["log_format"] for e in events if e.get("log_namespace") == "agentd.listen"]


def test_out_of_descriptors_pauses_the_port_with_doubling_pauses_logged_once(logged) -> None:
    clock, port, wrapped = Clock(), FakePort(), FailingSocket(errno.EMFILE)
    listening = _BackoffSocket(wrapped, AcceptBackoff(port, clock))  # type: ignore[arg-type]
    before = metrics.ACCEPT_ERRORS.labels("EMFILE")._value.get()
    pauses = []
    for _ in range(7):
        with pytest.raises(BlockingIOError) as raised:
            listening.accept()
        assert raised.value.errno == errno.EAGAIN  # Twisted's accept loop ends quietly
        assert not port.reading
        pause = min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds()
        pauses.append(round(pause, 3))
        clock.advance(pause)
        assert port.reading
    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.6, LONGEST_PAUSE_SECONDS, LONGEST_PAUSE_SECONDS]
    assert metrics.ACCEPT_ERRORS.labels("EMFILE")._value.get() == before + 7
    assert len(messages(logged)) == 1 and messages(logged)[0].startswith("cannot accept")
    # Descriptors come and go at the limit: one accept works, the next fails. Same episode.
    wrapped.failing, wrapped.waiting = False, 5
    listening.accept()
    wrapped.failing = True
    with pytest.raises(BlockingIOError):
        listening.accept()
    assert messages(logged) == [messages(logged)[0]]
    clock.advance(LONGEST_PAUSE_SECONDS)
    # The backlog drains: the episode ends, and the next one starts with a short pause.
    wrapped.failing = False
    for _ in range(4):
        listening.accept()
    with pytest.raises(BlockingIOError):
        listening.accept()
    assert messages(logged)[-1].startswith("accepting connections again")
    wrapped.failing = True
    with pytest.raises(BlockingIOError):
        listening.accept()
    pause = min(call.getTime() for call in clock.getDelayedCalls()) - clock.seconds()
    assert round(pause, 3) == 0.1
    assert len([m for m in messages(logged) if m.startswith("cannot accept")]) == 2


def test_a_port_stopped_during_a_pause_stays_stopped() -> None:
    clock, port = Clock(), FakePort()
    listening = _BackoffSocket(FailingSocket(errno.ENFILE), AcceptBackoff(port, clock))  # type: ignore[arg-type]
    with pytest.raises(BlockingIOError):
        listening.accept()
    port.connected = False
    clock.advance(1)
    assert not port.reading


def test_other_accept_errors_are_left_to_twisted() -> None:
    clock, port = Clock(), FakePort()
    listening = _BackoffSocket(FailingSocket(errno.ECONNABORTED), AcceptBackoff(port, clock))  # type: ignore[arg-type]
    with pytest.raises(ConnectionAbortedError):
        listening.accept()
    assert port.reading and not clock.getDelayedCalls()


class Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.callback(None)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["tcp", "ssl", "unix"])
@pytest_twisted.ensureDeferred
async def test_endpoint_strings_listen_with_the_backoff(kind: str, tmp_path: Path) -> None:
    description = {
        "tcp": "tcp:0:interface=127.0.0.1",
        "ssl": f"ssl:0:interface=127.0.0.1:privateKey={TEST_PEM}",
        "unix": f"unix:{tmp_path / 'agentd.sock'}",
    }[kind]
    endpoint = BackoffEndpoint(serverFromString(reactor, description), reactor)
    factory = Factory.forProtocol(Accepted)
    factory.accepted = Deferred()  # type: ignore[attr-defined]
    port: Any = await endpoint.listen(factory)
    try:
        assert isinstance(port.socket, _BackoffSocket)
        address = port.getHost()
        client = socket.socket(socket.AF_UNIX if kind == "unix" else socket.AF_INET)
        client.connect(address.name if kind == "unix" else ("127.0.0.1", address.port))
        await factory.accepted.addTimeout(5, reactor)  # type: ignore[attr-defined]
        client.close()
    finally:
        await port.stopListening()
