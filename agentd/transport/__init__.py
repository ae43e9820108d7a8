"""How a session reaches an agent process: the interface every transport implements.

A transport starts ``agentd-agent <agent>`` (or the configured command) for one session and
hands back an ``AgentProcess``; the process reports to an ``AgentSink``. Output is read line
by line, and a sink that cannot keep up pauses the process instead of buffering it.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
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
    """Which agent to start, for whom, with which environment (values never in repr)."""

    project: str
    agent: str
    user: str
    session: str
    env: Mapping[str, str] = field(default_factory=dict, repr=False)


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
        """Send one line (newline added) to the agent's stdin."""

    def pause(self) -> None:
        """Stop reading the agent's output until ``resume``; the agent blocks on writing."""

    def resume(self) -> None: ...

    def terminate(self) -> None:
        """End the agent: EOF on its stdin and a TERM signal; ``agent_ended`` follows."""


class AgentTransport(Protocol):
    def spawn(self, target: AgentTarget, sink: AgentSink) -> Deferred[AgentProcess]:
        """Start the agent; errbacks with ``TransportError`` when it cannot be reached."""

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


def command_argv(template: str, agent: str) -> list[str]:
    """The command for a local spawn: split into argv first, so nothing reaches a shell."""
    return [part.replace("{agent}", agent) for part in shlex.split(template)]


def remote_command(template: str, agent: str) -> str:
    """The command line for an SSH exec: the agent name shell-quoted into the template.

    The remote user's shell parses this string, so every substituted value is quoted even
    though agent names are already limited to configured, validated names.
    """
    return template.replace("{agent}", shlex.quote(agent))


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
