"""The SSH transport on a fake clock: idle close, the kill grace, refused channels, parallel
connects, connect timeouts and retries, the health check, and the transport [vms] builds.

The VM is a real Conch SSH server in memory: connections are made on a MemoryReactorClock
and their bytes moved by iosim pumps, so only the clock and the network are fake.
"""

from __future__ import annotations

import json
import shlex
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError, ValidPublicKey
from twisted.conch.ssh import common, connection, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED
from twisted.conch.ssh.factory import SSHFactory
from twisted.conch.ssh.keys import Key
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump
from zope.interface import implementer

from agentd import config
from agentd.transport import AgentTarget, AttachCommand, TransportError
from agentd.transport.ssh.channel import TERMINATE_GRACE_SECONDS
from agentd.transport.ssh.known_hosts import KnownHosts
from agentd.transport.ssh.pool import (
    DIRECT_RETRY_SECONDS,
    IDLE_CLOSE_SECONDS,
    MAX_REFUSALS,
    PARALLEL_CONNECTS,
)
from agentd.transport.ssh.settings import SSHSettings
from agentd.transport.ssh.transport import SSHTransport
from tests.samples import sample

PORT = 2222
USER = "coder"
SESSIONS = "/home/coder/.agentd/sessions"


class VMAgent(SSHChannel):
    """The VM's side of one agent channel: accepts env and exec, notes signals and EOF."""

    name = b"session"

    def __init__(self, vm: MemoryVM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command: bytes | None = None
        self.signals: list[bytes] = []
        self.eof = False
        self.ended = False
        vm.agents.append(self)

    def request_env(self, data: bytes) -> int:
        return 1

    def request_exec(self, data: bytes) -> int:
        self.command = common.getNS(data)[0]
        return 1

    def request_signal(self, data: bytes) -> int:
        self.signals.append(common.getNS(data)[0])
        return 1

    def eofReceived(self) -> None:
        self.eof = True

    def closed(self) -> None:
        self.ended = True

    def exit(self, status: int) -> None:
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", status))
        self.loseConnection()


class VMSocket(SSHChannel):
    """The VM's side of a stream-local channel to a holder's socket: notes what it is sent."""

    name = b"direct-streamlocal@openssh.com"

    def __init__(self, vm: MemoryVM, path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.received = b""
        self.ended = False
        vm.sockets.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def closed(self) -> None:
        self.ended = True


class VMUser(ConchUser):
    """One login: opens agent channels until the VM's MaxSessions is reached."""

    def __init__(self, vm: MemoryVM) -> None:
        super().__init__()
        self.vm = vm
        self.conn: connection.SSHConnection

    def lookupChannel(
        self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes
    ) -> SSHChannel:
        if channelType == VMSocket.name:
            # sshd connects to the socket; MaxSessions does not count these channels.
            path = common.getNS(data)[0].decode()
            self.vm.socket_opens.append(path)
            if path not in self.vm.listening:
                raise ConchError("open failed", OPEN_CONNECT_FAILED)
            kwargs = {"remoteWindow": windowSize, "remoteMaxPacket": maxPacket, "avatar": self}
            return VMSocket(self.vm, path, **kwargs)
        if len(self.conn.channels) >= self.vm.max_sessions:
            self.vm.refusals += 1
            raise ConchError("no more sessions", OPEN_ADMINISTRATIVELY_PROHIBITED)
        return VMAgent(self.vm, remoteWindow=windowSize, remoteMaxPacket=maxPacket, avatar=self)


@implementer(IRealm)
class VMRealm:
    def __init__(self, vm: MemoryVM) -> None:
        self.vm = vm

    def requestAvatar(self, avatarId: bytes, mind: object, *interfaces: Any) -> tuple:
        return interfaces[0], VMUser(self.vm), lambda: None


@implementer(ICredentialsChecker)
class AuthorizedKey:
    """sshd's authorized_keys with one key (Conch's own checker module warns on import)."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, key: Key) -> None:
        self.key = key

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes]:
        if credentials.blob != self.key.blob():
            return fail(UnauthorizedLogin())
        if credentials.signature is None:
            return fail(ValidPublicKey())  # asks the client to sign
        if not self.key.verify(credentials.signature, credentials.sigData):
            return fail(UnauthorizedLogin())
        return succeed(credentials.username)


class MemoryVM:
    """A VM reached on a MemoryReactorClock: Conch's sshd with its own host key, which the
    client's known_hosts lists, and the client's key authorized."""

    def __init__(
        self,
        reactor: MemoryReactorClock,
        directory: Path,
        max_sessions: int = 10,
        name: str = "127.0.0.1",
    ) -> None:
        self.reactor = reactor
        self.max_sessions = max_sessions
        self.refusals = 0
        self.agents: list[VMAgent] = []
        # Holders' sockets that accept stream-local channels, and every such channel asked for.
        self.listening: set[str] = set()
        self.socket_opens: list[str] = []
        self.sockets: list[VMSocket] = []
        self.pumps: list[IOPump] = []
        host_key = Key(ed25519.Ed25519PrivateKey.generate())
        self.client_key = Key(ed25519.Ed25519PrivateKey.generate())
        self.known_hosts = directory / "known_hosts"
        self.known_hosts.write_text(
            f"[{name}]:{PORT} {host_key.public().toString('openssh').decode()}\n"
        )
        factory = SSHFactory()
        factory.publicKeys = {b"ssh-ed25519": host_key.public()}
        factory.privateKeys = {b"ssh-ed25519": host_key}
        factory.primes = None
        factory.services = {
            b"ssh-userauth": self._userauth,
            b"ssh-connection": connection.SSHConnection,
        }
        factory.portal = Portal(VMRealm(self), [AuthorizedKey(self.client_key.public())])
        reactor.listenTCP(PORT, factory)
        self._completer = ConnectionCompleter(reactor)

    def _userauth(self) -> userauth.SSHUserAuthServer:
        service = userauth.SSHUserAuthServer()
        service.clock = self.reactor  # its login timeout, off the global reactor
        return service

    def connecting(self) -> int:
        """TCP connects in progress; the ones given up are dropped from the reactor's list."""
        live = [
            (client, connector)
            for client, connector in zip(self.reactor.tcpClients, self.reactor.connectors)
            if not connector.stoppedConnecting
        ]
        self.reactor.tcpClients[:] = [client for client, _ in live]
        self.reactor.connectors[:] = [connector for _, connector in live]
        return len(live)

    def accept(self) -> IOPump:
        """Complete the oldest pending TCP connect and run everything that follows."""
        self.connecting()
        pump = self._completer.succeedOnce()
        assert pump is not None, "no connection is being made"
        self.pumps.append(pump)
        self.flush()
        return pump

    def refuse(self) -> None:
        self.connecting()
        self._completer.failOnce()

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved

    def open_connections(self) -> int:
        return sum(not pump.clientIO.disconnected for pump in self.pumps)


class Sink:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.ended: tuple[int | None, str] | None = None

    def agent_lines(self, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    def agent_line(self, line: bytes) -> None:
        self.lines.append(line)

    def agent_log(self, line: bytes) -> None:
        pass

    def agent_overlong(self, stream: str, size: int) -> None:
        pass

    def agent_ended(self, exit_status: int | None, reason: str) -> None:
        self.ended = (exit_status, reason)


@pytest.fixture
def reactor() -> MemoryReactorClock:
    return MemoryReactorClock()


def make_transport(reactor: MemoryReactorClock, vm: MemoryVM, **settings: Any) -> SSHTransport:
    return SSHTransport(
        reactor,
        reactor,
        SSHSettings(
            user=USER,
            private_key=vm.client_key,
            known_hosts=KnownHosts(str(vm.known_hosts)),
            **{"attach": AttachCommand(sessions_dir=SESSIONS), **settings},
        ),
        lambda project: "127.0.0.1",
        PORT,
    )


def spawn(transport: SSHTransport, user: str = "u") -> tuple[Deferred[Any], Sink]:
    sink = Sink()
    d = transport.spawn(AgentTarget("demo", "echo", user, f"s-{user}"), sink)
    return d, sink


def result(d: Deferred[Any]) -> Any:
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen, "not fired"
    if isinstance(seen[0], Failure):
        seen[0].raiseException()
    return seen[0]


def failure(d: Deferred[Any]) -> BaseException:
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen and isinstance(seen[0], Failure), f"did not fail: {seen}"
    return seen[0].value


def test_an_unused_connection_is_closed_after_the_idle_time(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm)
    d, sink = spawn(transport)
    vm.accept()
    result(d)
    vm.agents[0].exit(0)
    vm.flush()
    assert sink.ended == (0, "exited with 0")
    reactor.advance(IDLE_CLOSE_SECONDS - 0.1)
    vm.flush()
    assert vm.open_connections() == 1
    reactor.advance(0.1)
    vm.flush()
    assert vm.open_connections() == 0
    assert transport.pool("demo").connections == []


def test_a_session_within_the_idle_time_reuses_the_connection_and_restarts_the_idle_time(
    reactor, tmp_path
):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm)
    d, _ = spawn(transport, "first")
    vm.accept()
    result(d)
    vm.agents[0].exit(0)
    vm.flush()
    reactor.advance(IDLE_CLOSE_SECONDS - 1)
    d, _ = spawn(transport, "second")
    assert vm.connecting() == 0
    vm.flush()
    result(d)
    vm.agents[1].exit(0)
    vm.flush()
    reactor.advance(2)  # past the first deadline
    vm.flush()
    assert vm.open_connections() == 1
    reactor.advance(IDLE_CLOSE_SECONDS - 2)
    vm.flush()
    assert vm.open_connections() == 0


def test_terminate_sends_term_and_eof_then_closes_the_channel_after_the_grace(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm)
    d, sink = spawn(transport)
    vm.accept()
    channel = result(d)
    channels_before = sample("agentd_ssh_channels")
    channel.terminate()
    vm.flush()
    (agent,) = vm.agents
    assert agent.signals == [b"TERM"] and agent.eof
    reactor.advance(TERMINATE_GRACE_SECONDS - 0.1)
    vm.flush()
    assert not agent.ended and sink.ended is None  # the agent ignores TERM
    reactor.advance(0.1)
    vm.flush()
    assert agent.ended
    assert sink.ended == (None, "channel closed")
    assert sample("agentd_ssh_channels") == channels_before - 1
    assert vm.open_connections() == 1  # only the channel was closed


def test_an_agent_that_exits_on_term_reports_its_status_and_is_not_killed(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm)
    d, sink = spawn(transport)
    vm.accept()
    result(d).terminate()
    vm.flush()
    vm.agents[0].exit(143)
    vm.flush()
    assert sink.ended == (143, "exited with 143")
    # what is left on the clock is the idle close of the connection, not a kill
    assert [call.getTime() for call in reactor.getDelayedCalls()] == [
        reactor.seconds() + IDLE_CLOSE_SECONDS
    ]


def test_a_refused_channel_spills_onto_a_new_connection_and_the_limit_is_remembered(
    reactor, tmp_path
):
    vm = MemoryVM(reactor, tmp_path, max_sessions=2)
    transport = make_transport(reactor, vm, max_channels=10)
    first = [spawn(transport, f"user{i}")[0] for i in range(2)]
    vm.accept()
    for d in first:
        result(d)
    third, _ = spawn(transport, "user2")
    vm.flush()
    assert vm.refusals == 1 and vm.connecting() == 1
    vm.accept()
    result(third)
    fourth, _ = spawn(transport, "user3")
    vm.flush()
    result(fourth)
    fifth, _ = spawn(transport, "user4")
    vm.flush()
    # the second connection is known to be full at 2: no refusal teaches it again
    assert vm.refusals == 1 and vm.connecting() == 1
    vm.accept()
    result(fifth)
    assert vm.open_connections() == 3 and len(vm.agents) == 5


def test_a_vm_that_refuses_every_channel_fails_the_session_after_the_refusal_cap(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path, max_sessions=0)
    transport = make_transport(reactor, vm)
    d, _ = spawn(transport)
    vm.accept()
    error = failure(d)
    assert isinstance(error, TransportError) and error.reason == "channels"
    assert vm.refusals == MAX_REFUSALS


def test_sessions_arriving_while_a_connection_is_made_share_it(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm)
    waiting = [spawn(transport, f"user{i}")[0] for i in range(3)]
    assert vm.connecting() == 1
    vm.accept()
    for d in waiting:
        result(d)
    assert vm.open_connections() == 1
    assert [agent.command for agent in vm.agents] == [
        b"agentd-agent attach --session s-user%d --user user%d --project demo --agent echo"
        b" --after 0 --sessions-dir=%s" % (i, i, SESSIONS.encode())
        for i in range(3)
    ]


def test_a_burst_makes_at_most_parallel_connects_connections_at_once(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm, max_channels=1)
    waiting = [spawn(transport, f"user{i}")[0] for i in range(PARALLEL_CONNECTS + 2)]
    assert vm.connecting() == PARALLEL_CONNECTS
    while vm.connecting():
        assert vm.connecting() <= PARALLEL_CONNECTS
        vm.accept()
    for d in waiting:
        result(d)
    assert vm.open_connections() == PARALLEL_CONNECTS + 2


def test_a_connect_that_times_out_is_retried_after_a_backoff(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(
        reactor, vm, connect_timeout=10.0, connect_attempts=3, backoff_base=0.5
    )
    timeouts = sample("agentd_ssh_connect_failures_total", reason="timeout")
    d, _ = spawn(transport)
    reactor.advance(9.9)
    assert vm.connecting() == 1 and not d.called
    reactor.advance(0.1)
    assert sample("agentd_ssh_connect_failures_total", reason="timeout") == timeouts + 1
    assert vm.connecting() == 0 and not d.called
    reactor.advance(0.5)  # full jitter: the first backoff is at most backoff_base
    assert vm.connecting() == 1
    vm.accept()
    result(d)


def test_a_vm_that_never_answers_fails_with_timeout_once_the_attempts_are_spent(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(
        reactor, vm, connect_timeout=10.0, connect_attempts=3, backoff_base=0.5
    )
    attempts = sample("agentd_ssh_connect_attempts_total")
    d, _ = spawn(transport)
    reactor.pump([0.5] * 80)
    error = failure(d)
    assert isinstance(error, TransportError) and error.reason == "timeout"
    assert sample("agentd_ssh_connect_attempts_total") == attempts + 3


def test_a_vm_that_accepts_tcp_but_never_speaks_ssh_is_dropped_and_retried(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(
        reactor, vm, connect_timeout=10.0, connect_attempts=3, backoff_base=0.5
    )
    d, _ = spawn(transport)
    silent = StringTransport()
    reactor.tcpClients.pop()[2].buildProtocol(None).makeConnection(silent)
    reactor.connectors.pop()
    reactor.advance(10.0)
    assert silent.disconnected  # aborted, not left half-open
    reactor.advance(0.5)
    vm.accept()
    result(d)


def test_the_ssh_health_check_is_degraded_while_a_vm_cannot_be_reached(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm, connect_attempts=1)
    (check,) = transport.health_checks()
    assert check.name == "ssh" and check.probe().status == "ok"
    d, _ = spawn(transport)
    vm.refuse()
    reactor.advance(1)  # HostnameEndpoint gives up once no address is left to try
    failure(d)
    degraded = check.probe()
    assert degraded.status == "degraded"
    assert degraded.detail == {"failing": True, "failing_vms": 1, "connections": 0}
    reactor.advance(300)  # a failure five minutes old no longer counts
    assert check.probe().status == "ok"


def test_from_config_reaches_the_vm_vms_names_with_its_key_user_and_command(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path, name="build-box.internal")
    key_file = tmp_path / "id_ed25519"
    key_file.write_bytes(vm.client_key.toString("openssh"))
    built = config.from_dict(
        {
            "agents": {
                "names": ["echo"],
                "command": "run-agent {agent}",
                "attach_command": "run-attach",
                "sessions_dir": "/srv/agent sessions",
            },
            "sessions": {"idle_seconds": 600},
            "vms": {
                "transport": "ssh",
                "host": "{project}.vms.internal",
                "hosts": {"demo": "build-box.internal"},
                "port": PORT,
                "user": USER,
                "private_key": str(key_file),
                "known_hosts": str(vm.known_hosts),
            },
        },
        env={},
    )
    transport = SSHTransport.from_config(built, reactor)
    target = AgentTarget("demo", "echo", "u'; rm -rf ~", "s-1", after=7, start=True)
    d = transport.spawn(target, Sink())
    vm.accept()
    # the host key checked is build-box.internal's, not demo.vms.internal's
    assert vm.socket_opens == ["/srv/agent sessions/s-1/sock"]
    assert vm.agents[0].command is not None
    assert vm.agents[0].command.decode().endswith(" --start-only")
    vm.agents[0].exit(2)  # an attach of before --start-only: the plain attach follows
    vm.flush()
    result(d)
    command = vm.agents[1].command.decode()
    assert command == (
        "run-attach --session s-1 --user 'u'\"'\"'; rm -rf ~'"
        " --project demo --agent echo --after 7 '--sessions-dir=/srv/agent sessions'"
        " --start --agent-command 'run-agent {agent}' --idle-seconds 600 --max-line 1048576"
    )
    assert shlex.split(command)[4] == "u'; rm -rf ~", "every value is one argument to the shell"


def hello_of(socket: VMSocket) -> dict[str, Any]:
    line, newline, rest = socket.received.partition(b"\n")
    assert newline and not rest, socket.received
    hello: dict[str, Any] = json.loads(line)
    return hello


def test_a_live_holder_is_reached_at_its_socket_without_running_the_attach(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    vm.listening.add(f"{SESSIONS}/s-u/sock")
    transport = make_transport(reactor, vm)
    sink = Sink()
    d = transport.spawn(AgentTarget("demo", "echo", "u", "s-u", after=12), sink)
    vm.accept()
    process = result(d)
    assert vm.agents == [], "no process runs on the VM"
    [socket] = vm.sockets
    assert hello_of(socket) == {
        "type": "hello",
        "v": 1,
        "session": "s-u",
        "user": "u",
        "project": "demo",
        "agent": "echo",
        "after": 12,
        "started": False,
    }
    socket.write(b'{"type":"attached"}\n{"seq":13,"type":"delta"}\n')
    vm.flush()
    assert sink.lines == [b'{"type":"attached"}', b'{"seq":13,"type":"delta"}']
    process.write_line(b'{"type":"confirm","seq":13}')
    vm.flush()
    assert socket.received.endswith(b'\n{"type":"confirm","seq":13}\n')
    process.terminate()
    vm.flush()
    assert socket.ended
    assert sink.ended == (None, "the session holder's connection closed")


def test_a_prompt_with_no_holder_starts_one_then_connects_to_its_socket(reactor, tmp_path):
    vm = MemoryVM(reactor, tmp_path)
    transport = make_transport(reactor, vm)
    sink = Sink()
    d = transport.spawn(AgentTarget("demo", "echo", "u", "s-u", start=True), sink)
    vm.accept()
    path = f"{SESSIONS}/s-u/sock"
    assert vm.socket_opens == [path]
    [starter] = vm.agents
    assert starter.command is not None
    assert shlex.split(starter.command.decode())[-2:] == ["1048576", "--start-only"]
    vm.listening.add(path)
    starter.write(b'{"type":"listening","started":true}\n')
    starter.exit(0)
    vm.flush()
    result(d)
    assert vm.socket_opens == [path, path]
    assert hello_of(vm.sockets[0])["started"] is True
    assert len(vm.agents) == 1, "the attach that started the holder relays nothing"


def test_a_vm_refusing_socket_channels_is_attached_through_the_command_for_a_while(
    reactor, tmp_path
):
    vm = MemoryVM(reactor, tmp_path)  # its sshd never connects a socket
    transport = make_transport(reactor, vm)
    d = transport.spawn(AgentTarget("demo", "echo", "u", "s-u", start=True), Sink())
    vm.accept()
    vm.agents[0].write(b'{"type":"listening","started":true}\n')
    vm.agents[0].exit(0)
    vm.flush()
    result(d)
    assert len(vm.socket_opens) == 2
    command = vm.agents[1].command
    assert command is not None and b" --start " in command and b"--start-only" not in command
    d, _ = spawn(transport, "v")
    vm.flush()
    result(d)
    assert len(vm.socket_opens) == 2, "not tried again"
    assert vm.agents[2].command is not None and b"--session s-v " in vm.agents[2].command
    # The VM's image may have been updated since: after a while, sockets are tried again.
    reactor.advance(DIRECT_RETRY_SECONDS)
    vm.listening.add(f"{SESSIONS}/s-w/sock")
    d, _ = spawn(transport, "w")
    vm.flush()
    result(d)
    assert len(vm.socket_opens) == 3 and len(vm.agents) == 3
