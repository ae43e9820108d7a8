"""One SSH connection to a VM: the handshake, host-key check, key auth, and why it failed."""

from __future__ import annotations

import socket
from collections.abc import Callable

from twisted.conch.ssh import transport
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.keys import Key
from twisted.conch.ssh.userauth import SSHUserAuthClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd.transport import TransportError
from agentd.transport.ssh.known_hosts import HostKeyError
from agentd.transport.ssh.settings import SSHSettings

_log = Logger()

# Linux only (0 elsewhere: delayed acknowledgements stay as the system has them).
_QUICKACK: int = getattr(socket, "TCP_QUICKACK", 0)


class _UserAuth(SSHUserAuthClient):
    def __init__(self, user: bytes, connection: SSHConnection, key: Key) -> None:
        super().__init__(user, connection)
        self._key = key
        self._offered = False

    def getPublicKey(self) -> Key | None:
        if self._offered:
            return None
        self._offered = True
        public: Key = self._key.public()
        return public

    def getPrivateKey(self) -> Deferred[Key]:
        return succeed(self._key)

    def getPassword(self, prompt: bytes | None = None) -> None:
        return None

    def getGenericAnswers(
        self, name: bytes, instruction: bytes, prompts: list[tuple[bytes, bool]]
    ) -> Deferred[list[bytes]]:
        return fail(NotImplementedError("keyboard-interactive is not used"))


class VMConnection(SSHConnection):
    """An SSH connection to one VM; knows how many agent channels it carries."""

    def __init__(self, ready: Deferred[VMConnection]) -> None:
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


class ClientTransport(transport.SSHClientTransport):
    """The SSH client of one connection: ``ready`` fires with the authenticated connection,
    or fails with why (``failure``: host key, auth, or lost on the way)."""

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
        self.ready: Deferred[VMConnection] = Deferred()
        self.connection: VMConnection | None = None
        self.failure: TransportError | None = None
        self.on_lost: Callable[[], None] = lambda: None
        self._socket: socket.socket | None = None

    def connectionMade(self) -> None:
        self._socket = None
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):  # TCP, not a test's transport
            # A small message (a prompt, an attach's hello) goes at once rather than
            # waiting, under Nagle's algorithm, for sshd to acknowledge the last one.
            handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket = handle if _QUICKACK else None
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        # sshd sends with Nagle's algorithm on (it turns it off for terminals only), so its
        # next small message (a channel's confirmation, the ``attached`` line, the replay
        # after it) waits for agentd to acknowledge the last, which Linux delays by up to
        # 40 ms when agentd has nothing to send back: one resume in ten took 40 ms longer.
        # So every read is acknowledged at once, for a system call per read.
        if self._socket is not None:
            self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        super().dataReceived(data)

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
        connected: Deferred[VMConnection] = Deferred()
        connection = VMConnection(connected)
        connected.addCallback(self._authenticated)
        user = self._settings.user.encode()
        self.requestService(_UserAuth(user, connection, self._settings.private_key))

    def _authenticated(self, connection: VMConnection) -> None:
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
