"""How a session reaches its agent: the interface every transport implements.

A transport connects one session to its holder on the project's VM or locally, and hands
back an ``AgentProcess``: the attach, which relays the holder's lines (docs/agent-cli.md).
The holder runs the agent and outlives the attach. A live holder is reached at its socket
directly (a unix socket here, a stream-local channel over SSH), which takes a round trip;
otherwise the transport runs ``agentd-agent attach`` (the configured ``attach_command``),
which starts the holder or serves a lost one's journal. ``attach`` below is that choice,
shared by both transports. The attach reports to an ``AgentSink``; output is read line by
line, and a sink that cannot keep up pauses the attach instead of buffering it.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from agentd import metrics
from agentd.agent.holder import wire

if TYPE_CHECKING:
    from agentd.config import Config
    from agentd.health import HealthCheck

# What a local agent inherits from agentd's own environment: where programs, its home and
# temporary files are, the locale and time zone, and whose process it is; about what sshd
# gives an exec session on a VM. Nothing else passes unless ``[vms] forward_env`` names it:
# agentd's environment holds its JWT secret, key-encryption keys and the operator's keys.
INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
)


def forwarded_env(names: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables among ``names`` that ``environ`` sets, with their values."""
    return {name: environ[name] for name in names if name in environ}


@dataclass(frozen=True)
class AgentTarget:
    """Which session to attach to, for whom, with which environment (values never in repr).

    ``after`` is the last seq the client has; ``start`` asks for a holder (and so an agent)
    when the session has none live.
    """

    project: str
    agent: str
    user: str
    session: str
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    after: int = 0
    start: bool = False


_log = Logger()

# The longest path a unix socket address holds (sun_path less its terminating NUL).
MAX_SOCKET_PATH = 107

# A numbered line is the agent's line with ``{"seq":N,`` in front: what agentd reads from an
# attach may be this much longer than the agent's own limit.
NUMBERING_ROOM = 64


@dataclass(frozen=True)
class AttachCommand:
    """How to run the attach: its command, and what a holder it starts is told."""

    command: str = "agentd-agent attach"
    sessions_dir: str = os.path.expanduser("~/.agentd/sessions")
    agent_command: str = "agentd-agent {agent}"
    idle_seconds: float = 3600.0
    max_line: int = 1_048_576

    @property
    def relay_limit(self) -> int:
        """The longest line agentd takes from the attach."""
        return self.max_line + NUMBERING_ROOM

    @classmethod
    def from_config(cls, config: Config) -> AttachCommand:
        sessions_dir = config.agents.sessions_dir
        if not sessions_dir and config.vms.transport == "ssh":
            sessions_dir = f"/home/{config.vms.user}/.agentd/sessions"
        elif not sessions_dir:
            # Where an attach run with agentd's environment would keep them.
            from agentd.agent.holder.sessions import sessions_dir as local_default

            sessions_dir = local_default(None, os.environ)
        return cls(
            command=config.agents.attach_command,
            sessions_dir=sessions_dir,
            agent_command=config.agents.command,
            idle_seconds=config.sessions.idle_seconds,
            max_line=config.server.max_message_bytes,
        )

    def arguments(self, target: AgentTarget) -> list[str]:
        """The attach's argv: ``command`` split like a shell would, then the options.

        Names reach this point validated (route.py), and every value is a separate argument:
        the SSH transport quotes each one for the remote shell.
        """
        argv = [
            *shlex.split(self.command),
            "--session",
            target.session,
            "--user",
            target.user,
            "--project",
            target.project,
            "--agent",
            target.agent,
            "--after",
            str(target.after),
            f"--sessions-dir={self.sessions_dir}",
        ]
        if target.start:
            argv += [
                "--start",
                "--agent-command",
                self.agent_command,
                "--idle-seconds",
                f"{self.idle_seconds:g}",
                "--max-line",
                str(self.max_line),
            ]
        return argv

    def remote(self, target: AgentTarget, *extra: str) -> str:
        """The command line for an SSH exec: every argument quoted for the remote shell."""
        return shlex.join([*self.arguments(target), *extra])

    def socket_path(self, session: str) -> str | None:
        """The session holder's socket, or None when the path is too long to connect to."""
        path = os.path.join(self.sessions_dir, session, "sock")
        return path if len(path.encode()) <= MAX_SOCKET_PATH else None

    def hello(self, target: AgentTarget, started: bool) -> bytes:
        """The line ``agentd-agent attach`` would send the holder first (agent-cli.md)."""
        t = target
        return wire.hello(t.session, t.user, t.project, t.agent, after=t.after, started=started)


class AgentSink(Protocol):
    def agent_lines(self, lines: list[bytes]) -> None:
        """Lines the agent wrote on stdout, in order, each without its newline: all the
        complete lines of one read, so per-read work is done once, not once per line."""

    def agent_line(self, line: bytes) -> None:
        """One line the agent wrote on stdout, without its newline."""

    def agent_log(self, line: bytes) -> None:
        """One line the agent wrote on stderr (its JSON logs)."""

    def agent_overlong(self, stream: str, size: int) -> None:
        """A line longer than the limit was dropped."""

    def agent_ended(self, exit_status: int | None, reason: str) -> None:
        """The process is gone; ``exit_status`` is None when it was killed or lost."""


class AgentProcess(Protocol):
    def write_line(self, line: bytes) -> None:
        """Send one line (newline added) to the attach's stdin, for the holder."""

    def pause(self) -> None:
        """Stop reading the attach's output until ``resume``; the holder keeps the lines in
        its journal, and pauses the agent when that is full."""

    def resume(self) -> None: ...

    def terminate(self) -> None:
        """Let go of the session: EOF on the attach's stdin, so it exits (the holder and its
        agent live on); ``agent_ended`` follows."""


class AgentTransport(Protocol):
    def spawn(self, target: AgentTarget, sink: AgentSink) -> Deferred[AgentProcess]:
        """Run the attach; errbacks with ``TransportError`` when it cannot be started."""

    def stop(self) -> Deferred[None]:
        """Close every connection this transport holds."""

    def health_checks(self) -> list[HealthCheck]:
        """What /health reports about reaching agents: none where nothing can be unreachable."""


class TransportError(Exception):
    """The agent could not be started. ``reason`` is a short fixed word for metrics and logs;
    ``transient`` says whether trying again later may succeed."""

    def __init__(self, reason: str, detail: str, transient: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.transient = transient


class LineSplitter:
    """Splits a byte stream into lines, dropping (and reporting) lines over ``max_length``.

    With ``on_lines``, the complete lines of each chunk are delivered in one call (per-read
    work is then done once, not once per line); otherwise each goes to ``on_line``. A last
    line without a newline goes to ``on_line`` from ``flush``.
    """

    __slots__ = ("_buffer", "_discarding", "_max", "_on_line", "_on_lines", "_on_overlong")

    def __init__(
        self,
        max_length: int,
        on_line: Callable[[bytes], None],
        on_overlong: Callable[[int], None],
        on_lines: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self._max = max_length
        self._on_line = on_line
        self._on_overlong = on_overlong
        self._on_lines = on_lines or self._one_by_one
        self._buffer = b""
        self._discarding = 0

    def _one_by_one(self, lines: list[bytes]) -> None:
        on_line = self._on_line
        for line in lines:
            on_line(line)

    def feed(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        lines = data.split(b"\n")
        tail = lines.pop()
        if lines and self._discarding:
            self._on_overlong(self._discarding + len(lines[0]))
            self._discarding = 0
            del lines[0]
        if lines:
            if max(map(len, lines)) > self._max:
                self._deliver_checked(lines)
            else:
                self._on_lines(lines)
        if self._discarding or len(tail) > self._max:
            self._discarding += len(tail)
        else:
            self._buffer = tail

    def _deliver_checked(self, lines: list[bytes]) -> None:
        """The rare chunk with an overlong line: each is reported in its place."""
        good: list[bytes] = []
        for line in lines:
            if len(line) > self._max:
                if good:
                    self._on_lines(good)
                    good = []
                self._on_overlong(len(line))
            else:
                good.append(line)
        if good:
            self._on_lines(good)

    def flush(self) -> None:
        """End of stream: a last line without a newline still counts."""
        if self._discarding:
            self._on_overlong(self._discarding)
        elif self._buffer:
            self._on_line(self._buffer)
        self._buffer = b""
        self._discarding = 0


def output_splitters(sink: AgentSink, max_line: int) -> tuple[LineSplitter, LineSplitter]:
    """The stdout and stderr splitters every transport feeds an agent's output through."""
    stdout = LineSplitter(
        max_line,
        sink.agent_line,
        lambda n: sink.agent_overlong("stdout", n),
        on_lines=sink.agent_lines,
    )
    stderr = LineSplitter(max_line, sink.agent_log, lambda n: sink.agent_overlong("stderr", n))
    return stdout, stderr


class NoHolder(Exception):
    """No holder answered at the session's socket: none is live, or it cannot be reached
    there."""


class Route(Protocol):
    """The two ways a transport reaches a session, as ``attach`` uses them."""

    # False once reaching a holder at its socket failed right after it said it listens: the
    # VM does not allow it (sshd's AllowStreamLocalForwarding), so it is not tried for a while.
    direct: bool

    @property
    def where(self) -> str:
        """The VM (or "local"), for the log."""

    def connect(
        self, target: AgentTarget, sink: AgentSink, started: bool
    ) -> Deferred[AgentProcess]:
        """The holder's socket, the hello sent; errbacks with ``NoHolder``."""

    def run(self, target: AgentTarget, sink: AgentSink, *extra: str) -> Deferred[AgentProcess]:
        """``agentd-agent attach`` with ``extra`` arguments; errbacks with ``TransportError``."""


async def attach(route: Route, target: AgentTarget, sink: AgentSink) -> AgentProcess:
    """Connect ``sink`` to the session's holder: directly when it is live; else, when the
    target asks for a start, start it with ``--start-only`` and connect directly; else (or
    when that fails) through ``agentd-agent attach``, which starts holders and serves the
    journals of lost ones."""
    if route.direct:
        try:
            return _counted("socket", await route.connect(target, sink, False))
        except NoHolder:
            pass
        if target.start:
            started = await _start_only(route, target)
            if started is not None:
                try:
                    return _counted("socket", await route.connect(target, sink, started))
                except NoHolder:
                    route.direct = False
                    _log.warn(
                        "{where}: a session holder listens but its socket cannot be reached;"
                        " attaching through attach_command for now (is"
                        " AllowStreamLocalForwarding off in sshd_config?)",
                        where=route.where,
                    )
    return _counted("command", await route.run(target, sink))


def _counted(via: str, process: AgentProcess) -> AgentProcess:
    metrics.ATTACHES.labels(via).inc()
    return process


async def _start_only(route: Route, target: AgentTarget) -> bool | None:
    """Start the session's holder unless one is live: whether this started it, or None when
    the attach refused (the plain attach that follows reports why)."""
    answer = _FirstLine()
    try:
        await route.run(target, answer, "--start-only")
    except TransportError:
        return None
    line = await answer.done
    try:
        said = json.loads(line) if line is not None else None
    except ValueError:
        return None
    if not isinstance(said, dict) or said.get("type") != "listening":
        return None
    return said.get("started") is True


class _FirstLine:
    """A sink for an attach that only answers: its first line, once it has ended."""

    def __init__(self) -> None:
        self.line: bytes | None = None
        self.done: Deferred[bytes | None] = Deferred()

    def agent_lines(self, lines: list[bytes]) -> None:
        if self.line is None and lines:
            self.line = lines[0]

    def agent_line(self, line: bytes) -> None:
        self.agent_lines([line])

    def agent_log(self, line: bytes) -> None:
        pass  # the plain attach that follows a refusal reports it

    def agent_overlong(self, stream: str, size: int) -> None:
        pass

    def agent_ended(self, exit_status: int | None, reason: str) -> None:
        self.done.callback(self.line)
