"""write_now: bytes leave at once when nothing is queued before them, else as write queues them.

Real loopback TCP connections and a real child process's pipe, in the test's reactor.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet import protocol, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from agentd.directwrite import write_now


class Peer(protocol.Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(None)


@pytest_twisted.async_yield_fixture
async def connection() -> AsyncIterator[tuple[Peer, socket.socket]]:
    """A Twisted connection and the plain socket at its other end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
        peer = await connectProtocol(endpoint, Peer())
        other, _ = listener.accept()
    try:
        yield peer, other
    finally:
        peer.transport.abortConnection()  # type: ignore[attr-defined]
        other.close()


def received_now(other: socket.socket) -> bytes:
    try:
        return other.recv(1 << 20, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


async def next_passes() -> None:
    for _ in range(3):
        await deferLater(reactor, 0, lambda: None)


@pytest_twisted.ensureDeferred
async def test_bytes_leave_at_once_when_nothing_is_queued(
    connection: tuple[Peer, socket.socket],
) -> None:
    peer, other = connection
    write_now(peer.transport, b"hello")
    # Sent before the reactor ran again, and the reactor need not watch for writability.
    assert received_now(other) == b"hello"
    assert peer.transport not in reactor.getWriters()


@pytest_twisted.ensureDeferred
async def test_bytes_queued_before_keep_their_place(
    connection: tuple[Peer, socket.socket],
) -> None:
    peer, other = connection
    peer.transport.write(b"first ")  # type: ignore[attr-defined]
    write_now(peer.transport, b"second")
    assert received_now(other) == b""
    await next_passes()
    assert received_now(other) == b"first second"


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def read_exactly(other: socket.socket, size: int) -> bytes:
    chunks = []
    other.settimeout(10)
    while size:
        chunk = other.recv(min(size, 1 << 20))
        assert chunk
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_is_queued_and_pauses_the_producer(
    connection: tuple[Peer, socket.socket],
) -> None:
    peer, other = connection
    producer = Producer()
    peer.transport.registerProducer(producer, True)  # type: ignore[attr-defined]
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than loopback's buffers hold
    write_now(peer.transport, data)
    write_now(peer.transport, b"and then this")  # queued behind the rest
    assert producer.paused
    got = await threads.deferToThread(read_exactly, other, len(data) + len(b"and then this"))
    assert got == data + b"and then this"
    await next_passes()
    assert not producer.paused


@pytest_twisted.ensureDeferred
async def test_a_connection_reset_is_reported_as_write_reports_it(
    connection: tuple[Peer, socket.socket],
) -> None:
    peer, other = connection
    # Close with a reset: the next send fails.
    other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    other.close()
    await deferLater(reactor, 0.05, lambda: None)
    for _ in range(3):
        write_now(peer.transport, b"x" * 100_000)  # never raises
    await peer.lost


class Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_lines_reach_a_child_process_in_order() -> None:
    child = Child()
    process: Any = reactor.spawnProcess(child, "/bin/cat", ["cat"], env={})
    stdin = process.pipes[0]
    write_now(stdin, b"one\n")
    assert stdin not in reactor.getWriters()
    process.write(b"two\n")  # queued by Twisted
    write_now(stdin, b"three\n")  # behind it
    await next_passes()
    process.closeStdin()
    await child.ended
    assert child.out == b"one\ntwo\nthree\n"


def test_other_transports_queue_as_write_does() -> None:
    transport = StringTransport()
    write_now(transport, b"queued")
    assert transport.value() == b"queued"
