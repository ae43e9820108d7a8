"""One attach on a VM: an exec channel running ``agentd-agent attach`` (its environment,
exit status), or a stream-local channel straight to a live holder's socket.

Output flow control is explicit: while a session is paused the channel's receive window is
not re-opened, so sshd stops reading from the attach or the socket.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

from twisted.conch.ssh import common
from twisted.conch.ssh.channel import SSHChannel
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from agentd.transport import AgentSink, NoHolder, TransportError, output_splitters
from agentd.transport.ssh.connection import VMConnection

TERMINATE_GRACE_SECONDS = 5.0


class ChannelRefused(Exception):
    """sshd would not open another session channel on this connection (MaxSessions)."""


class _Relay(SSHChannel):
    """What both kinds of attach channel do with the holder's lines and the session's."""

    conn: VMConnection
    paused = False

    def __init__(self, sink: AgentSink, max_line: int, conn: VMConnection) -> None:
        super().__init__(conn=conn)
        self.sink = sink
        self._stdout, self._stderr = output_splitters(sink, max_line)

    def dataReceived(self, data: bytes) -> None:
        self._stdout.feed(data)

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


class HolderChannel(_Relay):
    """A live holder's socket on the VM, reached through sshd (``direct-streamlocal``): the
    attach without a process on the VM, ready once sshd connected it and the hello is sent."""

    name = b"direct-streamlocal@openssh.com"

    def __init__(
        self,
        sink: AgentSink,
        hello: bytes,
        max_line: int,
        conn: VMConnection,
        on_closed: Callable[[], None],
    ) -> None:
        super().__init__(sink, max_line, conn)
        self.ready: Deferred[HolderChannel] = Deferred()
        self._hello = hello
        self._on_closed = on_closed

    @staticmethod
    def open_data(path: str) -> bytes:
        """The channel-open data: the socket's path, then two fields OpenSSH reserves."""
        return common.NS(path.encode()) + common.NS(b"") + struct.pack(">L", 0)

    def openFailed(self, reason: Failure | BaseException) -> None:
        self._on_closed()
        self.ready.errback(NoHolder())

    def channelOpen(self, specificData: bytes) -> None:
        self.write(self._hello)
        self.ready.callback(self)

    def closed(self) -> None:
        self._on_closed()
        self._stdout.flush()
        reason = "the session holder's connection closed"
        if getattr(self.conn, "lost", False):
            reason = "connection to the VM lost"
        self.sink.agent_ended(None, reason)

    def terminate(self) -> None:
        if not (self.closing or self.localClosed):
            self.loseConnection()


class AgentChannel(_Relay):
    """``agentd-agent attach`` on a VM: stdin/stdout/stderr of an exec request."""

    name = b"session"

    def __init__(
        self,
        sink: AgentSink,
        command: str,
        env: Mapping[str, str],
        max_line: int,
        clock: IReactorTime,
        conn: VMConnection,
        on_closed: Callable[[], None],
    ) -> None:
        """``on_closed`` is called when the channel of an agent that started closes, before
        the sink hears of it: the pool's count of channels is right by the time a session
        reacts to its agent's end."""
        super().__init__(sink, max_line, conn)
        self.ready: Deferred[AgentChannel] = Deferred()
        self.ready.addCallback(self._agent_started)
        self._command = command
        self._env = env
        self._clock = clock
        self._exit_status: int | None = None
        self._exit_reason = "channel closed"
        self._kill_call: IDelayedCall | None = None
        self._on_closed = on_closed
        self._started = False

    def _agent_started(self, channel: AgentChannel) -> AgentChannel:
        self._started = True
        return channel

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
        if self._started:
            self._on_closed()
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
    def terminate(self) -> None:
        if self.closing or self.localClosed:
            return
        self.resume()  # let the agent write its last lines (partial usage)
        self.conn.sendRequest(self, b"signal", common.NS(b"TERM"))
        self.conn.sendEOF(self)
        self._kill_call = self._clock.callLater(TERMINATE_GRACE_SECONDS, self.loseConnection)
