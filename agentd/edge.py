"""Limits at the HTTP edge: deadlines for each request's head and body, and caps on the
connections that have not authenticated, in total and per client address.

Twisted's HTTPChannel has only an idle timeout, which every byte resets: a client trickling
one byte every few seconds holds its connection, and its file descriptor, for ever. Here each
request's head must be complete within ``[server] request_head_timeout_seconds`` (from the
connection's start, or from the first byte of a later request on a kept-alive connection)
and its body within ``request_body_timeout_seconds`` after that.

A connection counts as unauthenticated from its accept until its request becomes an
authenticated WebSocket upgrade; plain HTTP requests (health, metrics, the API) count for as
long as the connection lasts. When a new connection would exceed a cap, the connection that
has waited longest for its next request is closed to make room, provided it has waited at
least ``EVICT_AFTER_SECONDS``; a client that trickles its head therefore cannot lock anyone
out, while clients whose requests are already on their way (a reconnect storm accepted in
one batch) are never cut. If no connection qualifies, the new one is closed at once: reading
a request only to refuse it would hold the descriptor the cap exists to protect.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.server import Site

from agentd import metrics
from agentd.clientaddr import ClientAddresses, IPAddress, address_key
from agentd.config import ServerConfig
from agentd.refusal import Refused

_log = Logger()

# How long a connection must have waited for its request before a newcomer may displace it:
# well above a request's round trip, well below a head deadline.
EVICT_AFTER_SECONDS = 1.0
# After a limit closes a connection, how long its last bytes may take to leave before the
# connection is aborted (a client that stops reading must not keep the descriptor).
CLOSE_GRACE_SECONDS = 2.0

_TIMEOUT_RESPONSE = Refused(408, "request not complete in time").response()

# Phases of a guarded channel. Waiting for a head or body, or idle between requests, is
# "waiting" (the channel may be displaced); "busy" means a request is being answered.
_HEAD, _BODY, _BUSY, _IDLE, _DONE = "head", "body", "busy", "idle", "done"


class ConnectionLimits:
    """The deadlines and caps every guarded channel of this process shares."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        head_seconds: float,
        body_seconds: float,
        max_unauthenticated: int,
        max_per_address: int,
        addresses: ClientAddresses,
    ) -> None:
        self.clock = clock
        self.head_seconds = head_seconds
        self.body_seconds = body_seconds
        self.max_unauthenticated = max_unauthenticated
        self.max_per_address = max_per_address
        self.addresses = addresses
        self._open: set[GuardedChannel] = set()
        self._by_address: dict[str, set[GuardedChannel]] = {}
        # Insertion order is the order in which channels began to wait: oldest first.
        self._waiting: dict[GuardedChannel, float] = {}
        self._waiting_by_address: dict[str, dict[GuardedChannel, float]] = {}

    @classmethod
    def from_config(cls, server: ServerConfig, clock: IReactorTime) -> ConnectionLimits:
        return cls(
            clock,
            head_seconds=server.request_head_timeout_seconds,
            body_seconds=server.request_body_timeout_seconds,
            max_unauthenticated=server.max_unauthenticated_connections,
            max_per_address=server.max_unauthenticated_per_address,
            addresses=ClientAddresses(server.trusted_proxies, server.client_address_header),
        )

    @property
    def unauthenticated(self) -> int:
        return len(self._open)

    def open(self, channel: GuardedChannel, peer: IAddress | None) -> bool:
        """Count a new connection in, making room if a cap is reached; False: refuse it."""
        # A trusted proxy's connection counts under a client once a request names one.
        channel.behind_proxy = self.addresses.is_proxy(peer)
        key = None if channel.behind_proxy else self.addresses.peer_key(peer)
        if key is not None and len(self._by_address.get(key, ())) >= self.max_per_address:
            if not self._displace(self._waiting_by_address.get(key), "per_address"):
                return False
        if len(self._open) >= self.max_unauthenticated:
            if not self._displace(self._waiting, "total"):
                return False
        self._open.add(channel)
        self._enter(channel, key)
        self.waiting(channel)
        metrics.UNAUTHENTICATED_CONNECTIONS.set(len(self._open))
        return True

    def attribute(self, channel: GuardedChannel, address: IPAddress | None) -> bool:
        """Count a proxy's connection under the client its request names; False when that
        client is over its cap and nothing of its can be displaced."""
        if channel not in self._open:
            return True
        key = None if address is None else address_key(address)
        if key == channel.address_key:
            return True
        self.busy(channel)  # it is: its request is about to be answered
        self._leave(channel)
        self._enter(channel, key)
        if key is None or len(self._by_address[key]) <= self.max_per_address:
            return True
        return self._displace(self._waiting_by_address.get(key), "per_address")

    def waiting(self, channel: GuardedChannel) -> None:
        """The channel waits for a request (again): it may be displaced, oldest first."""
        if channel not in self._open:
            return
        self.busy(channel)
        now = self.clock.seconds()
        self._waiting[channel] = now
        if channel.address_key is not None:
            self._waiting_by_address.setdefault(channel.address_key, {})[channel] = now

    def busy(self, channel: GuardedChannel) -> None:
        """The channel's request is being answered: it must not be displaced."""
        self._waiting.pop(channel, None)
        key = channel.address_key
        if key is None or key not in self._waiting_by_address:
            return
        waiting = self._waiting_by_address[key]
        waiting.pop(channel, None)
        if not waiting:
            del self._waiting_by_address[key]

    def release(self, channel: GuardedChannel) -> None:
        """The channel is closing or became an authenticated WebSocket: it counts no more."""
        if channel not in self._open:
            return
        self.busy(channel)
        self._leave(channel)
        self._open.discard(channel)
        metrics.UNAUTHENTICATED_CONNECTIONS.set(len(self._open))

    def _enter(self, channel: GuardedChannel, key: str | None) -> None:
        channel.address_key = key
        if key is not None:
            self._by_address.setdefault(key, set()).add(channel)

    def _leave(self, channel: GuardedChannel) -> None:
        key = channel.address_key
        if key is None:
            return
        members = self._by_address[key]
        members.discard(channel)
        if not members:
            del self._by_address[key]
        channel.address_key = None

    def _displace(self, waiting: dict[GuardedChannel, float] | None, limit: str) -> bool:
        if waiting:
            channel, since = next(iter(waiting.items()))
            if self.clock.seconds() - since >= EVICT_AFTER_SECONDS:
                metrics.CONNECTIONS_LIMITED.labels(limit, "evicted").inc()
                channel.evict()
                return True
        metrics.CONNECTIONS_LIMITED.labels(limit, "refused").inc()
        return False


class GuardedChannel(HTTPChannel):
    """An HTTP/1.1 channel under the deadlines and caps of its ``limits``."""

    limits: ConnectionLimits
    site: Site
    behind_proxy = False
    address_key: str | None = None
    _phase = _HEAD
    _received = False
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self._start(_HEAD, self.limits.head_seconds)

    def dataReceived(self, data: bytes) -> None:
        if data and self._phase == _IDLE:
            # The next request on a kept-alive connection: its head gets a deadline of its
            # own; the gap before it was the idle timeout's business.
            self.limits.waiting(self)
            self._start(_HEAD, self.limits.head_seconds)
        if data and self._phase == _HEAD:
            self._received = True
        super().dataReceived(data)  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def allHeadersReceived(self) -> None:
        self._cancel()
        super().allHeadersReceived()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        if self._phase == _HEAD and self.length != 0:
            self._start(_BODY, self.limits.body_seconds)

    def allContentReceived(self) -> None:
        self._cancel()
        self._phase = _BUSY
        self.limits.busy(self)
        super().allContentReceived()  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def requestDone(self, request: Request) -> None:
        if self._phase == _BUSY:
            self._phase = _IDLE
            self._received = False
            self.limits.waiting(self)
        super().requestDone(request)  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._phase = _DONE
        self.limits.release(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # unannotated in Twisted

    def authenticated(self) -> None:
        """The request became an authenticated WebSocket upgrade; the socket leaves HTTP."""
        self._cancel()
        self._phase = _DONE
        self.limits.release(self)

    def evict(self) -> None:
        _log.debug("closing a waiting connection to make room for a new one")
        self._close(None)

    def _start(self, phase: str, seconds: float) -> None:
        self._cancel()
        self._phase = phase
        self._deadline = self.limits.clock.callLater(seconds, self._expired)

    def _cancel(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        phase = self._phase
        metrics.REQUEST_TIMEOUTS.labels(phase).inc()
        _log.debug("request {phase} not complete in time; closing", phase=phase)
        # A connection that never sent a byte (a browser's speculative preconnect) is closed
        # without an answer; one that began a request learns why it ends.
        self._close(_TIMEOUT_RESPONSE if phase == _BODY or self._received else None)

    def _close(self, response: bytes | None) -> None:
        self._cancel()
        self._phase = _DONE
        self.limits.release(self)
        transport: Any = self.transport
        if transport is None or transport.disconnecting:
            return
        if response:
            transport.write(response)
        self.loseConnection()  # type: ignore[no-untyped-call]  # unannotated in Twisted
        self._abort = self.limits.clock.callLater(CLOSE_GRACE_SECONDS, transport.abortConnection)


def authenticated(request: Request) -> None:
    """The request's connection is becoming an authenticated WebSocket: the HTTP deadlines
    and the unauthenticated caps stop applying (autobahn's own timeouts and pings take over)."""
    channel = request.channel
    if isinstance(channel, GuardedChannel):
        channel.authenticated()
