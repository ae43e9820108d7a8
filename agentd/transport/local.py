"""The local transport: sessions attached on this host (development, the embedded default)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import error, main, tcp, unix
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorProcess, IReactorUNIX, ITransport
from twisted.internet.process import Process, ProcessReader
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure

from agentd.config import Config
from agentd.directwrite import write_now
from agentd.transport import (
    INHERITED_ENV,
    AgentProcess,
    AgentSink,
    AgentTarget,
    AttachCommand,
    NoHolder,
    TransportError,
    attach,
    forwarded_env,
    output_splitters,
)

if TYPE_CHECKING:
    from agentd.health import HealthCheck

# Twisted reads a child's pipes 8 KiB at a time. An agent streaming small deltas refills
# that many times a millisecond, and each read is a trip through the reactor and a wakeup of
# the writer; taking what a full pipe holds at once relays about 40% more messages a second.
PIPE_READ_BYTES = 65536


class _PipeReader(ProcessReader):
    def doRead(self) -> BaseException | None:
        try:
            data = os.read(self.fd, PIPE_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not data:
            return main.CONNECTION_DONE
        self.dataReceived(data)
        return None


class _AgentProcess(Process):
    processReaderFactory = _PipeReader


class _AgentProcessProtocol(ProcessProtocol):
    # Process, unlike IProcessTransport, can pause reading the agent's output pipes.
    transport: _AgentProcess

    def __init__(self, sink: AgentSink, max_line: int) -> None:
        self._sink = sink
        self._stdout, self._stderr = output_splitters(sink, max_line)

    def outReceived(self, data: bytes) -> None:
        self._stdout.feed(data)

    def errReceived(self, data: bytes) -> None:
        self._stderr.feed(data)

    def processEnded(self, reason: Failure) -> None:
        self._stdout.flush()
        self._stderr.flush()
        if reason.check(error.ProcessDone):
            status: int | None = 0
        else:
            status = getattr(reason.value, "exitCode", None)
        signal_number = getattr(reason.value, "signal", None)
        why = f"killed by signal {signal_number}" if signal_number else f"exited with {status}"
        self._sink.agent_ended(status, why)

    # AgentProcess
    def write_line(self, line: bytes) -> None:
        # Process.write hands the line to the stdin pipe's writer, which would queue it.
        stdin = self.transport.pipes.get(0)
        if stdin is not None:
            write_now(stdin, line + b"\n")

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def terminate(self) -> None:
        try:
            self.transport.closeStdin()
            self.transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            pass


class _HolderSocket(unix.Client):
    """The connection to a holder's socket, read and written as the byte stream it is.

    Twisted's UNIX connections receive with ``recvmsg``, with room for 4 KiB of passed
    descriptors on every read, and send with ``sendmsg``: a sixth of the reads' cost went to
    that, for a holder that never passes one. These are the TCP connection's ``recv`` and
    ``send``; a descriptor something passed anyway is closed by the kernel, unreceived.
    """

    doRead = tcp.Connection.doRead  # type: ignore[assignment]  # a mixin's loose stub
    writeSomeData = tcp.Connection.writeSomeData


class _HolderConnector(unix.Connector):
    def _makeTransport(self) -> Any:  # Twisted annotates it as a TCP client
        return _HolderSocket(self.address, self, self.reactor, self.checkPID)


class _HolderSockets:
    """``connectUNIX`` for ``UNIXClientEndpoint``, connecting with ``_HolderSocket``."""

    def __init__(self, reactor: IReactorUNIX) -> None:
        self._reactor = reactor

    def connectUNIX(
        self, address: str, factory: Any, timeout: float = 30, checkPID: bool = False
    ) -> _HolderConnector:
        connector = _HolderConnector(address, factory, timeout, self._reactor, checkPID)
        connector.connect()
        return connector


class _HolderConnection(Protocol):
    """A session holder's unix socket, connected straight from agentd: the attach, without
    a process in between."""

    transport: ITransport

    def __init__(self, sink: AgentSink, max_line: int, hello: bytes) -> None:
        self._sink = sink
        self._stdout, _ = output_splitters(sink, max_line)
        self._hello = hello

    def connectionMade(self) -> None:
        write_now(self.transport, self._hello)

    def dataReceived(self, data: bytes) -> None:
        self._stdout.feed(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._stdout.flush()
        self._sink.agent_ended(None, "the session holder's connection closed")

    # AgentProcess
    def write_line(self, line: bytes) -> None:
        write_now(self.transport, line + b"\n")

    def pause(self) -> None:
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def terminate(self) -> None:
        self.transport.loseConnection()


class LocalTransport:
    """Runs the attach as a child process of agentd, without a shell; a holder it starts is
    detached from agentd, so sessions outlive agentd here as on a VM.

    The environment is built, never inherited: ``INHERITED_ENV`` and ``forward_env`` as
    agentd's environment (``environ``) had them when the transport was made, then the
    session's provider keys. A holder started by the attach, and its agent, get the same.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        attach: AttachCommand,
        forward_env: tuple[str, ...] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._attach = attach
        self._max_line = attach.relay_limit
        self._env = forwarded_env(
            (*INHERITED_ENV, *forward_env), os.environ if environ is None else environ
        )
        # An agent without PATH could not find the programs it runs: the system's default.
        self._env.setdefault("PATH", os.defpath)
        self.direct = True
        self.where = "local"

    @classmethod
    def from_config(cls, config: Config, reactor: IReactorProcess) -> LocalTransport:
        v = config.vms
        return cls(reactor, AttachCommand.from_config(config), forward_env=v.forward_env)

    def _argv(self, target: AgentTarget) -> list[str]:
        argv = self._attach.arguments(target)
        # An installed agentd-agent sits next to the interpreter running agentd, which may
        # not be on PATH (a virtualenv that was never activated).
        found = shutil.which(argv[0]) or shutil.which(argv[0], path=os.path.dirname(sys.executable))
        if found is None:
            raise TransportError("spawn", f"{argv[0]}: command not found")
        return [found, *argv[1:]]

    def spawn(self, target: AgentTarget, sink: AgentSink) -> Deferred[AgentProcess]:
        return Deferred.fromCoroutine(attach(self, target, sink))

    def connect(
        self, target: AgentTarget, sink: AgentSink, started: bool
    ) -> Deferred[AgentProcess]:
        path = self._attach.socket_path(target.session)
        if path is None:
            return fail(NoHolder())
        holder = _HolderConnection(sink, self._max_line, self._attach.hello(target, started))
        endpoint = UNIXClientEndpoint(_HolderSockets(IReactorUNIX(self._reactor)), path)

        def refused(failure: Failure) -> Failure:
            failure.trap(error.ConnectError)
            raise NoHolder()

        connected: Deferred[AgentProcess] = connectProtocol(endpoint, holder).addCallback(
            lambda _: holder
        )
        return connected.addErrback(refused)

    def run(self, target: AgentTarget, sink: AgentSink, *extra: str) -> Deferred[AgentProcess]:
        argv = [*self._argv(target), *extra]
        env = {**self._env, **target.env}
        protocol = _AgentProcessProtocol(sink, self._max_line)
        try:
            _AgentProcess(self._reactor, argv[0], argv, env, None, protocol)
        except OSError as e:
            raise TransportError("spawn", e.strerror or "cannot start the attach") from None
        return succeed(protocol)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def health_checks(self) -> list[HealthCheck]:
        return []
