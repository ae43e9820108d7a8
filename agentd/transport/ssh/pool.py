"""The SSH transport: one exec channel per agent, multiplexed over pooled connections per VM.

Host keys are checked against an OpenSSH ``known_hosts`` file, including ``[host]:port``
entries and hashed (``|1|``) names, which Conch's own ``KnownHostsFile`` does not match by
port. Unknown and changed keys are refused. Output flow control is explicit: while a session
is paused the channel's receive window is not re-opened, so sshd stops reading from the agent.
"""

from __future__ import annotations

import binascii
import re
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.conch.client.knownhosts import HashedEntry, PlainEntry
from twisted.conch.error import InvalidEntry
from twisted.conch.ssh import common, transport
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.conch.ssh.userauth import SSHUserAuthClient
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd import metrics
from agentd.retry import retry
from agentd.transport import (
    AgentProcess,
    AgentSink,
    AgentTarget,
    TransportError,
    output_splitters,
    remote_command,
)

_log = Logger()

IDLE_CLOSE_SECONDS = 60.0
TERMINATE_GRACE_SECONDS = 5.0
# Connections being made to one VM at once: a burst of new sessions does not wait for the
# handshakes one after another, and stays well under sshd's MaxStartups (10 by default).
PARALLEL_CONNECTS = 4
# Refused channels one session tolerates before giving up (a VM that refuses every channel).
MAX_REFUSALS = 64


class HostKeyError(Exception):
    def __init__(self, kind: str, host: str) -> None:
        super().__init__(f"{kind} host key for {host}")
        self.kind = kind


class KnownHosts:
    """Reads an OpenSSH known_hosts file on every check, so VMs can be added without a restart."""

    def __init__(self, path: str) -> None:
        self.path = path

    @staticmethod
    def host_name(host: str, port: int) -> bytes:
        return (host if port == 22 else f"[{host}]:{port}").encode()

    def check(self, host: str, port: int, key: Key) -> None:
        name = self.host_name(host, port)
        seen = False
        with open(self.path, "rb") as f:
            for raw in f:
                line = raw.strip()
                if not line or line.startswith(b"#"):
                    continue
                revoked = line.startswith(b"@revoked ")
                if line.startswith(b"@") and not revoked:
                    continue  # @cert-authority: certificates are not used for VMs
                if revoked:
                    line = line.split(None, 1)[1]
                try:
                    entry = (
                        HashedEntry.fromString(line)
                        if line.startswith(HashedEntry.MAGIC)
                        else PlainEntry.fromString(line)
                    )
                except (binascii.Error, InvalidEntry, BadKeyError, ValueError):
                    # a line Conch cannot parse matches nothing, as in OpenSSH
                    continue
                if isinstance(entry, HashedEntry):
                    if not entry.matchesHost(name):
                        continue
                elif not _host_patterns_match(line.split(None, 1)[0], name):
                    continue
                if revoked:
                    if entry.matchesKey(key):
                        raise HostKeyError("revoked", name.decode())
                    continue
                seen = True
                if entry.matchesKey(key):
                    return
        raise HostKeyError("changed" if seen else "unknown", name.decode())


def _host_patterns_match(patterns: bytes, name: bytes) -> bool:
    """OpenSSH's pattern lists: comma-separated, ``*`` and ``?`` wildcards, ``!`` negates."""
    matched = False
    for pattern in patterns.lower().split(b","):
        negated = pattern.startswith(b"!")
        if negated:
            pattern = pattern[1:]
        regex = re.escape(pattern).replace(rb"\*", b".*").replace(rb"\?", b".")
        if re.fullmatch(regex, name.lower()):
            if negated:
                return False
            matched = True
    return matched


@dataclass(frozen=True)
class SSHSettings:
    user: str
    private_key: Key = field(repr=False)
    known_hosts: KnownHosts
    command: str
    forward_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    connect_timeout: float = 10.0
    connect_attempts: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    max_channels: int = 10
    max_line: int = 1_048_576


class _UserAuth(SSHUserAuthClient):
    def __init__(self, user: bytes, connection: SSHConnection, key: Key) -> None:
        super().__init__(user, connection)
        self._key = key
        self._offered = False

    def getPublicKey(self) -> Key | None:
        if self._offered:
            return None
        self._offered = True
        return self._key.public()

    def getPrivateKey(self) -> Deferred[Key]:
        return succeed(self._key)

    def getPassword(self, prompt: bytes | None = None) -> None:
        return None

    def getGenericAnswers(self, name: bytes, instruction: bytes, prompts: Any) -> Deferred[Any]:
        return fail(NotImplementedError("keyboard-interactive is not used"))


class _Connection(SSHConnection):
    """An SSH connection to one VM; knows how many agent channels it carries."""

    def __init__(self, ready: Deferred[_Connection]) -> None:
        super().__init__()
        self._ready = ready
        self.agent_channels = 0
        self.full_at: int | None = None
        self.lost = False

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self._ready.callback(self)

    def adjustWindow(self, channel: SSHChannel, bytesToAdd: int) -> None:
        # Conch re-opens the window whenever half of it is used; a paused agent channel keeps
        # it closed so sshd stops reading the agent's output.
        if getattr(channel, "paused", False):
            return
        super().adjustWindow(channel, bytesToAdd)

    def has_room(self, limit: int) -> bool:
        cap = limit if self.full_at is None else min(limit, self.full_at)
        return not self.lost and self.agent_channels < cap


class _ClientTransport(transport.SSHClientTransport):
    # Conch offers hmac-sha2-512 first. hmac-sha2-256 is as sound a MAC and, on CPUs with SHA
    # instructions, computes twice as fast; the MAC is the SSH hop's largest cost per byte.
    supportedMACs = [
        b"hmac-sha2-256",
        *(m for m in transport.SSHClientTransport.supportedMACs if m != b"hmac-sha2-256"),
    ]

    def __init__(self, host: str, port: int, settings: SSHSettings) -> None:
        self._host = host
        self._port = port
        self._settings = settings
        self.ready: Deferred[_Connection] = Deferred()
        self.connection: _Connection | None = None
        self.failure: TransportError | None = None
        self.on_lost: Callable[[], None] = lambda: None

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        try:
            self._settings.known_hosts.check(self._host, self._port, Key.fromString(hostKey))
        except HostKeyError as e:
            _log.error(
                "refusing {vm}: {kind} host key {fingerprint}",
                vm=f"{self._host}:{self._port}",
                kind=e.kind,
                fingerprint=fingerprint.decode("ascii", "replace"),
            )
            self.failure = TransportError("host_key", f"{e.kind} host key")
            return fail(e)
        except OSError as e:
            self.failure = TransportError("host_key", f"known_hosts unreadable: {e.strerror}")
            return fail(e)
        return succeed(True)

    def connectionSecure(self) -> None:
        connected: Deferred[_Connection] = Deferred()
        connection = _Connection(connected)
        connected.addCallback(self._authenticated)
        user = self._settings.user.encode()
        self.requestService(_UserAuth(user, connection, self._settings.private_key))

    def _authenticated(self, connection: _Connection) -> None:
        self.connection = connection
        self.ready.callback(connection)

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if reason == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE and self.failure is None:
            self.failure = TransportError("auth", "public key authentication refused")
        super().sendDisconnect(reason, desc)

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if self.failure is None and not self.ready.called:
            self.failure = TransportError(
                "lost", description.decode("utf-8", "replace")[:200], transient=True
            )
        super().receiveError(reasonCode, description)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if self.connection is not None:
            self.connection.lost = True
        if not self.ready.called:
            failure = self.failure or TransportError(
                "lost", "connection closed during the SSH handshake", transient=True
            )
            self.ready.errback(failure)
        else:
            self.on_lost()


class AgentChannel(SSHChannel):
    """One agent process on a VM: stdin/stdout/stderr of an exec request."""

    name = b"session"
    conn: _Connection

    def __init__(
        self,
        sink: AgentSink,
        command: str,
        env: Mapping[str, str],
        max_line: int,
        clock: IReactorTime,
        conn: _Connection,
    ) -> None:
        super().__init__(conn=conn)
        self.sink = sink
        self.ready: Deferred[AgentChannel] = Deferred()
        self.paused = False
        self._command = command
        self._env = env
        self._clock = clock
        self._exit_status: int | None = None
        self._exit_reason = "channel closed"
        self._kill_call: Any = None
        self._stdout, self._stderr = output_splitters(sink, max_line)

    def openFailed(self, reason: Failure | BaseException) -> None:
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        if not self.ready.called:
            self.ready.errback(ChannelRefused(str(failure.value)))

    def channelOpen(self, specificData: bytes) -> None:
        defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        conn = self.conn
        try:
            for name, value in self._env.items():
                try:
                    await conn.sendRequest(
                        self, b"env", common.NS(name.encode()) + common.NS(value.encode()), True
                    )
                except Exception:
                    raise TransportError(
                        "env_refused", f"sshd refused environment variable {name} (AcceptEnv)"
                    ) from None
            try:
                await conn.sendRequest(self, b"exec", common.NS(self._command.encode()), True)
            except Exception:
                raise TransportError("exec", "sshd refused to run the agent command") from None
        except TransportError as e:
            self.loseConnection()
            self.ready.errback(e)
            return
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self._stdout.feed(data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        self._stderr.feed(data)

    def request_exit_status(self, data: bytes) -> int:
        (self._exit_status,) = struct.unpack(">L", data[:4])
        self._exit_reason = f"exited with {self._exit_status}"
        return 1

    def request_exit_signal(self, data: bytes) -> int:
        signal_name, _ = common.getNS(data)
        self._exit_reason = f"killed by signal {signal_name.decode('ascii', 'replace')}"
        return 1

    def closed(self) -> None:
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._stdout.flush()
        self._stderr.flush()
        if self.ready.called:
            reason = self._exit_reason
            if self._exit_status is None and getattr(self.conn, "lost", False):
                reason = "connection to the VM lost"
            self.sink.agent_ended(self._exit_status, reason)

    # AgentProcess
    def write_line(self, line: bytes) -> None:
        if not self.closing:
            self.write(line + b"\n")

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            wanted = self.localWindowSize - self.localWindowLeft
            if wanted > 0 and not self.localClosed:
                self.conn.adjustWindow(self, wanted)

    def terminate(self) -> None:
        if self.closing or self.localClosed:
            return
        self.resume()  # let the agent write its last lines (partial usage)
        self.conn.sendRequest(self, b"signal", common.NS(b"TERM"))
        self.conn.sendEOF(self)
        self._kill_call = self._clock.callLater(TERMINATE_GRACE_SECONDS, self.loseConnection)


class ChannelRefused(Exception):
    """sshd would not open another session channel on this connection (MaxSessions)."""


def _classify(e: BaseException) -> TransportError:
    if isinstance(e, TransportError):
        return e
    if isinstance(e, error.ConnectionRefusedError):
        return TransportError("refused", "connection refused", transient=True)
    if isinstance(e, error.TimeoutError | defer.TimeoutError | defer.CancelledError):
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
        self.waiters: list[Deferred[_Connection]] = []


class _VMPool:
    """Connections to one VM; a new one is opened when every existing one is full.

    The channels a connection may carry are ``max_channels``, or fewer once the VM refused
    more (sshd's MaxSessions): what one connection taught applies to the next.
    """

    def __init__(
        self, host: str, port: int, settings: SSHSettings, reactor: Any, clock: IReactorTime
    ) -> None:
        self.host = host
        self.port = port
        self._settings = settings
        self._reactor = reactor
        self._clock = clock
        self.connections: list[_Connection] = []
        self._transports: dict[_Connection, _ClientTransport] = {}
        self._attempts: list[_Attempt] = []
        self._refused_at: int | None = None
        self._idle_calls: dict[_Connection, Any] = {}
        self.last_failure: tuple[float, str] | None = None

    @property
    def vm(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect_once(self) -> Deferred[_Connection]:
        metrics.SSH_CONNECT_ATTEMPTS.inc()
        started = time.perf_counter()
        proto = _ClientTransport(self.host, self.port, self._settings)
        endpoint = HostnameEndpoint(
            self._reactor, self.host, self.port, timeout=self._settings.connect_timeout
        )
        d = connectProtocol(endpoint, proto)
        d.addCallback(lambda _: proto.ready)
        d.addTimeout(self._settings.connect_timeout, self._clock)

        def connected(conn: _Connection) -> _Connection:
            metrics.SSH_CONNECT_SECONDS.observe(time.perf_counter() - started)
            metrics.SSH_CONNECTIONS.inc()
            self.connections.append(conn)
            self.last_failure = None
            self._transports[conn] = proto
            proto.on_lost = lambda: self._lost(conn)
            return conn

        def failed(failure: Failure) -> Failure:
            transport = proto.transport
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()  # type: ignore[attr-defined]
            e = _classify(failure.value)  # type: ignore[arg-type]
            if proto.failure is not None and isinstance(failure.value, defer.CancelledError):
                e = proto.failure
            metrics.SSH_CONNECT_FAILURES.labels(e.reason).inc()
            self.last_failure = (self._clock.seconds(), e.reason)
            _log.warn(
                "SSH connection to {vm} failed: {reason} ({detail})",
                vm=self.vm,
                reason=e.reason,
                detail=e.detail,
            )
            return Failure(e)

        d.addCallbacks(connected, failed)
        return d

    def _cap(self) -> int:
        limit = self._settings.max_channels
        return limit if self._refused_at is None else min(limit, self._refused_at)

    def _connect(self) -> Deferred[_Connection]:
        """A connection for one more session: a place in an attempt in flight that will have
        room for it, or a new attempt, up to PARALLEL_CONNECTS at once."""
        waiter: Deferred[_Connection] = Deferred()
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

        def settle(result: _Connection | Failure) -> None:
            self._attempts.remove(attempt)
            for w in attempt.waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        connecting.addBoth(settle)
        return waiter

    def _lost(self, conn: _Connection) -> None:
        if conn in self._transports:
            del self._transports[conn]
            self.connections.remove(conn)
            metrics.SSH_CONNECTIONS.dec()
            call = self._idle_calls.pop(conn, None)
            if call is not None and call.active():
                call.cancel()
            _log.info("SSH connection to {vm} closed", vm=self.vm)

    async def open(self, target: AgentTarget, sink: AgentSink) -> AgentChannel:
        s = self._settings
        command = remote_command(s.command, target.agent)
        env = {**s.forward_env, **target.env}
        refusals = 0
        while refusals < MAX_REFUSALS:
            conn = next((c for c in self.connections if c.has_room(self._cap())), None)
            if conn is None:
                conn = await self._connect()
                if not conn.has_room(self._cap()):
                    continue  # others took its last slots first: wait for the next one
            channel = AgentChannel(sink, command, env, s.max_line, self._clock, conn)
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
            original_closed = channel.closed

            def closed(
                c: _Connection = conn, original: Callable[[], None] = original_closed
            ) -> None:
                metrics.SSH_CHANNELS.dec()
                self._release(c)
                original()

            channel.closed = closed  # type: ignore[method-assign]
            return channel
        raise TransportError("channels", "could not open a channel on any connection")

    def _release_on_failure(self, failure: Failure, conn: _Connection) -> Failure:
        self._release(conn)
        return failure

    def _release(self, conn: _Connection) -> None:
        conn.agent_channels -= 1
        if conn.agent_channels == 0 and not conn.lost:
            self._idle_calls[conn] = self._clock.callLater(
                IDLE_CLOSE_SECONDS, self._close_idle, conn
            )

    def _cancel_idle(self, conn: _Connection) -> None:
        call = self._idle_calls.pop(conn, None)
        if call is not None and call.active():
            call.cancel()

    def _close_idle(self, conn: _Connection) -> None:
        self._idle_calls.pop(conn, None)
        if conn.agent_channels == 0:
            proto = self._transports.get(conn)
            if proto is not None:
                proto.loseConnection()

    def close(self) -> None:
        for proto in list(self._transports.values()):
            proto.loseConnection()


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
        self._pools: dict[tuple[str, int], _VMPool] = {}

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

    def pool(self, project: str) -> _VMPool:
        host = self._host_for(project)
        key = (host, self._port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _VMPool(
                host, self._port, self._settings, self._reactor, self._clock
            )
        return pool

    def spawn(self, target: AgentTarget, sink: AgentSink) -> Deferred[AgentProcess]:
        try:
            pool = self.pool(target.project)
        except (KeyError, ValueError) as e:
            return fail(TransportError("unreachable", str(e)))
        return defer.ensureDeferred(pool.open(target, sink))  # type: ignore[return-value]

    def stop(self) -> Deferred[None]:
        for pool in self._pools.values():
            pool.close()
        return succeed(None)


def load_private_key(path: str) -> Key:
    return Key.fromFile(path)
