"""Listening endpoints that stop accepting for a while when the process runs out of file
descriptors (or the system of files, buffers or memory), instead of failing every connection.

Twisted's TCP port meets EMFILE by closing a reserved descriptor, accepting every waiting
connection into it and closing each at once, with three log lines per connection: under a
flood, a health check or a reconnecting client is reset and the log fills. Here the port
stops reading its socket for 0.1 s, doubling to 2 s while the failures last, so waiting
connections stay in the kernel's listen backlog until descriptors are free again. An
episode lasts until the backlog is empty; it is logged once when it starts and once when it
ends, however many connections come and go at the limit meanwhile.
"""

from __future__ import annotations

import errno
import resource
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from agentd import metrics

_log = Logger()

FIRST_PAUSE_SECONDS = 0.1
LONGEST_PAUSE_SECONDS = 2.0
RESOURCE_ERRORS = {
    errno.EMFILE: "EMFILE",
    errno.ENFILE: "ENFILE",
    errno.ENOBUFS: "ENOBUFS",
    errno.ENOMEM: "ENOMEM",
}


def open_file_limit() -> int:
    """The process's soft limit on open file descriptors."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class AcceptBackoff:
    """Pauses one listening port while accept() fails for lack of a resource."""

    def __init__(self, port: Any, clock: IReactorTime) -> None:
        self._port = port
        self._clock = clock
        self._pause = FIRST_PAUSE_SECONDS
        self._episode_started: float | None = None
        self._pauses = 0

    def caught_up(self) -> None:
        """No connection is waiting: whatever piled up during an episode has been accepted."""
        if self._episode_started is None:
            return
        _log.info(
            "accepting connections again after {seconds:.1f} s ({pauses} pauses)",
            seconds=self._clock.seconds() - self._episode_started,
            pauses=self._pauses,
        )
        self._episode_started = None
        self._pauses = 0
        self._pause = FIRST_PAUSE_SECONDS

    def failed(self, error: str) -> None:
        metrics.ACCEPT_ERRORS.labels(error).inc()
        if self._episode_started is None:
            self._episode_started = self._clock.seconds()
            _log.warn(
                "cannot accept connections: {error} (open file limit {limit}); pausing "
                "accept until descriptors are free, waiting clients stay in the backlog",
                error=error,
                limit=open_file_limit(),
            )
        self._pauses += 1
        self._port.stopReading()
        self._clock.callLater(self._pause, self._resume_reading)
        self._pause = min(self._pause * 2, LONGEST_PAUSE_SECONDS)

    def _resume_reading(self) -> None:
        # A port stopped meanwhile stays stopped.
        if self._port.connected and not self._port.disconnecting:
            self._port.startReading()


class _BackoffSocket:
    """The port's listening socket, seen through accept(): a resource error pauses the port
    and reads as "no connection waiting", which ends Twisted's accept loop quietly."""

    def __init__(self, wrapped: socket.socket, backoff: AcceptBackoff) -> None:
        self._wrapped = wrapped
        self._backoff = backoff

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return self._wrapped.accept()
        except BlockingIOError:
            self._backoff.caught_up()
            raise
        except OSError as e:
            error = RESOURCE_ERRORS.get(e.errno or 0)
            if error is None:
                raise
            self._backoff.failed(error)
            raise BlockingIOError(errno.EAGAIN, "accepting paused") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


@implementer(IStreamServerEndpoint)
class BackoffEndpoint:
    """Listens through ``endpoint``; TCP, TLS and UNIX ports get the accept backoff."""

    def __init__(self, endpoint: IStreamServerEndpoint, clock: IReactorTime) -> None:
        self._endpoint = endpoint
        self._clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = self._endpoint.listen(protocolFactory)
        return listening.addCallback(self._guard)

    def _guard(self, port: IListeningPort) -> IListeningPort:
        # ssl: listens on a TCP port under a TLS wrapper, and unix.Port is a tcp.Port too.
        if isinstance(port, tcp.Port) and getattr(port, "socket", None) is not None:
            port.socket = _BackoffSocket(port.socket, AcceptBackoff(port, self._clock))
        return port
