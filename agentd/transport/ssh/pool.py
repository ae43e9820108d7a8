"""Connections to one VM: shared by its sessions, opened in parallel, retried, closed idle.

A connection carries up to ``max_channels`` agent channels; when sshd refuses one more
(MaxSessions), the pool learns the limit and opens another connection instead of failing.
"""

from __future__ import annotations

import time
from functools import partial

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd import metrics
from agentd.retry import retry
from agentd.transport import AgentProcess, AgentSink, AgentTarget, NoHolder, TransportError
from agentd.transport.ssh.channel import AgentChannel, ChannelRefused, HolderChannel
from agentd.transport.ssh.connection import ClientTransport, VMConnection
from agentd.transport.ssh.settings import SSHSettings

_log = Logger()

IDLE_CLOSE_SECONDS = 60.0
# Connections being made to one VM at once: a burst of new sessions does not wait for the
# handshakes one after another, and stays well under sshd's MaxStartups (10 by default).
PARALLEL_CONNECTS = 4
# Refused channels one session tolerates before giving up (a VM that refuses every channel).
MAX_REFUSALS = 64
DIRECT_RETRY_SECONDS = 600.0


def _classify(e: BaseException) -> TransportError:
    if isinstance(e, TransportError):
        return e
    if isinstance(e, error.ConnectionRefusedError):
        return TransportError("refused", "connection refused", transient=True)
    if isinstance(e, error.TimeoutError | defer.TimeoutError | defer.CancelledError):
        return TransportError("timeout", "connection timed out", transient=True)
    if isinstance(e, error.ConnectingCancelledError):
        # what HostnameEndpoint reports when the connect timeout cuts off a TCP connect
        return TransportError("timeout", "connection timed out", transient=True)
    if isinstance(e, error.DNSLookupError | error.NoRouteError):
        return TransportError("unreachable", "host unreachable", transient=True)
    if isinstance(e, error.ConnectionLost | error.ConnectionDone | error.ConnectError):
        return TransportError("lost", "connection lost", transient=True)
    return TransportError("other", type(e).__name__)


class _Attempt:
    """A connection being made, and the sessions waiting for it."""

    __slots__ = ("room", "waiters")

    def __init__(self, room: int) -> None:
        self.room = room
        self.waiters: list[Deferred[VMConnection]] = []


class VMPool:
    """Connections to one VM; a new one is opened when every existing one is full.

    The channels a connection may carry are ``max_channels``, or fewer once the VM refused
    more (sshd's MaxSessions): what one connection taught applies to the next.
    """

    def __init__(
        self,
        host: str,
        port: int,
        settings: SSHSettings,
        reactor: IReactorTCP,
        clock: IReactorTime,
    ) -> None:
        self.host = host
        self.port = port
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self.connections: list[VMConnection] = []
        self._transports: dict[VMConnection, ClientTransport] = {}
        self._attempts: list[_Attempt] = []
        self._refused_at: int | None = None
        self._idle_calls: dict[VMConnection, IDelayedCall] = {}
        self.last_failure: tuple[float, str] | None = None
        self._direct_refused_at: float | None = None

    @property
    def vm(self) -> str:
        return f"{self.host}:{self.port}"

    where = vm

    @property
    def direct(self) -> bool:
        """Whether to try the holder's socket: not for DIRECT_RETRY_SECONDS after sshd
        refused a socket channel to a holder that had just said it listens (its
        AllowStreamLocalForwarding is off, unless a VM image was updated since)."""
        refused = self._direct_refused_at
        return refused is None or self._clock.seconds() - refused >= DIRECT_RETRY_SECONDS

    @direct.setter
    def direct(self, usable: bool) -> None:
        self._direct_refused_at = None if usable else self._clock.seconds()

    async def _connect_once(self) -> VMConnection:
        metrics.SSH_CONNECT_ATTEMPTS.inc()
        started = time.perf_counter()
        proto = ClientTransport(self.host, self.port, self._settings)
        endpoint = HostnameEndpoint(
            self._reactor, self.host, self.port, timeout=self._settings.connect_timeout
        )
        connecting: Deferred[ClientTransport] = connectProtocol(endpoint, proto)
        ready = connecting.addCallback(lambda _: proto.ready)
        ready.addTimeout(self._settings.connect_timeout, self._clock)
        try:
            conn: VMConnection = await ready
        except Exception as e:
            raise self._connect_failed(proto, e) from None
        metrics.SSH_CONNECT_SECONDS.observe(time.perf_counter() - started)
        metrics.SSH_CONNECTIONS.inc()
        self.connections.append(conn)
        self.last_failure = None
        self._transports[conn] = proto
        proto.on_lost = lambda: self._lost(conn)
        return conn

    def _connect_failed(self, proto: ClientTransport, cause: Exception) -> TransportError:
        transport = proto.transport
        if transport is not None and getattr(transport, "connected", False):
            # ITransport has no abortConnection; the TCP transports that connect here do.
            transport.abortConnection()  # type: ignore[attr-defined]
        e = _classify(cause)
        if proto.failure is not None and isinstance(cause, defer.CancelledError):
            e = proto.failure
        metrics.SSH_CONNECT_FAILURES.labels(e.reason).inc()
        self.last_failure = (self._clock.seconds(), e.reason)
        _log.warn(
            "SSH connection to {vm} failed: {reason} ({detail})",
            vm=self.vm,
            reason=e.reason,
            detail=e.detail,
        )
        return e

    def _cap(self) -> int:
        limit = self._settings.max_channels
        return limit if self._refused_at is None else min(limit, self._refused_at)

    def _connect(self) -> Deferred[VMConnection]:
        """A connection for one more session: a place in an attempt in flight that will have
        room for it, or a new attempt, up to PARALLEL_CONNECTS at once."""
        waiter: Deferred[VMConnection] = Deferred()
        attempt = next((a for a in self._attempts if a.room > 0), None)
        if attempt is None and len(self._attempts) >= PARALLEL_CONNECTS:
            attempt = self._attempts[0]  # its connection may be full by then: ask again after
        if attempt is not None:
            attempt.room -= 1
            attempt.waiters.append(waiter)
            return waiter
        attempt = _Attempt(self._cap() - 1)
        attempt.waiters.append(waiter)
        self._attempts.append(attempt)
        s = self._settings
        connecting = retry(
            self._connect_once,
            attempts=s.connect_attempts,
            base=s.backoff_base,
            cap=s.backoff_cap,
            clock=self._clock,
            is_transient=lambda e: isinstance(e, TransportError) and e.transient,
            on_retry=lambda n, delay, e: _log.info(
                "retrying SSH connection to {vm} in {delay:.2f}s", vm=self.vm, delay=delay
            ),
        )

        def settle(result: VMConnection | Failure) -> None:
            self._attempts.remove(attempt)
            for w in attempt.waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        connecting.addBoth(settle)
        return waiter

    def _lost(self, conn: VMConnection) -> None:
        if conn in self._transports:
            del self._transports[conn]
            self.connections.remove(conn)
            metrics.SSH_CONNECTIONS.dec()
            call = self._idle_calls.pop(conn, None)
            if call is not None and call.active():
                call.cancel()
            _log.info("SSH connection to {vm} closed", vm=self.vm)

    def connect(
        self, target: AgentTarget, sink: AgentSink, started: bool
    ) -> Deferred[AgentProcess]:
        return Deferred.fromCoroutine(self._connect_holder(target, sink, started))

    async def _connect_holder(
        self, target: AgentTarget, sink: AgentSink, started: bool
    ) -> AgentProcess:
        """A stream-local channel to the session holder's socket (no process on the VM);
        raises NoHolder when sshd cannot connect it. sshd's MaxSessions does not count these
        channels, but they keep their connection from closing idle like the others."""
        s = self._settings
        path = s.attach.socket_path(target.session)
        if path is None:
            raise NoHolder()
        conn = next((c for c in self.connections if not c.lost), None)
        if conn is None:
            conn = await self._connect()
        hello = s.attach.hello(target, started)
        channel = HolderChannel(
            sink, hello, s.max_line, conn, on_closed=partial(self._channel_closed, conn)
        )
        conn.agent_channels += 1
        metrics.SSH_CHANNELS.inc()
        self._cancel_idle(conn)
        conn.openChannel(channel, HolderChannel.open_data(path))
        return await channel.ready

    def run(self, target: AgentTarget, sink: AgentSink, *extra: str) -> Deferred[AgentProcess]:
        return Deferred.fromCoroutine(self.open(target, sink, *extra))

    async def open(self, target: AgentTarget, sink: AgentSink, *extra: str) -> AgentChannel:
        s = self._settings
        command = s.attach.remote(target, *extra)
        env = {**s.forward_env, **target.env}
        refusals = 0
        while refusals < MAX_REFUSALS:
            conn = next((c for c in self.connections if c.has_room(self._cap())), None)
            if conn is None:
                conn = await self._connect()
                if not conn.has_room(self._cap()):
                    continue  # others took its last slots first: wait for the next one
            channel = AgentChannel(
                sink,
                command,
                env,
                s.max_line,
                self._clock,
                conn,
                on_closed=partial(self._channel_closed, conn),
            )
            conn.agent_channels += 1
            self._cancel_idle(conn)
            channel.ready.addErrback(self._release_on_failure, conn)
            conn.openChannel(channel)
            try:
                await channel.ready
            except ChannelRefused:
                if conn.lost:
                    continue
                refusals += 1
                conn.full_at = max(1, conn.agent_channels)
                self._refused_at = min(self._refused_at or conn.full_at, conn.full_at)
                _log.info(
                    "{vm} refused channel {n} on one connection; using another",
                    vm=self.vm,
                    n=conn.full_at,
                )
                continue
            metrics.SSH_CHANNELS.inc()
            return channel
        raise TransportError("channels", "could not open a channel on any connection")

    def _channel_closed(self, conn: VMConnection) -> None:
        metrics.SSH_CHANNELS.dec()
        self._release(conn)

    def _release_on_failure(self, failure: Failure, conn: VMConnection) -> Failure:
        self._release(conn)
        return failure

    def _release(self, conn: VMConnection) -> None:
        conn.agent_channels -= 1
        if conn.agent_channels == 0 and not conn.lost:
            self._idle_calls[conn] = self._clock.callLater(
                IDLE_CLOSE_SECONDS, self._close_idle, conn
            )

    def _cancel_idle(self, conn: VMConnection) -> None:
        call = self._idle_calls.pop(conn, None)
        if call is not None and call.active():
            call.cancel()

    def _close_idle(self, conn: VMConnection) -> None:
        self._idle_calls.pop(conn, None)
        if conn.agent_channels == 0:
            proto = self._transports.get(conn)
            if proto is not None:
                proto.loseConnection()

    def close(self) -> None:
        for proto in list(self._transports.values()):
            proto.loseConnection()
