"""The agent process a session holder runs: its pipes, read and written without blocking.

Its stdout is cut into lines (an overlong one is dropped and logged) and handed to the
holder, which may pause reading while the journal has no room; its stderr goes to the
holder's log; its stdin takes the lines the client sends. The holder learns through
``ChildEvents`` what happened, and asks ``release`` how the agent ended once it has.
"""

from __future__ import annotations

import fcntl
import io
import os
import selectors
import subprocess
from collections.abc import Sequence
from typing import Protocol

from agentd.agent.holder import sessions
from agentd.agent.log import Log

# The agent's stdout is read this much at a time: what its pipe is made to hold. Twice the
# default, so that a fast agent's lines come in fewer, larger batches (each costs the holder
# a wakeup, a journal write and a send besides its lines); larger still measured slower.
READ_BYTES = 131072


class ChildEvents(Protocol):
    """What the holder does with what the agent does."""

    def agent_lines(self, lines: list[bytes]) -> None:
        """Complete lines from the agent's stdout, in order, each with its newline."""

    def agent_stderr(self, lines: list[bytes]) -> None:
        """Non-blank lines from the agent's stderr, already in the holder's log."""

    def agent_changed(self) -> None:
        """The agent exited or closed its stdout: it may have ended (see ``ended``)."""

    def agent_dropped(self, reason: str, size: int) -> None:
        """A stdout line was dropped (``overlong`` or ``not_json``), already logged."""


class AgentChild:
    """The agent process and its three pipes, registered with the holder's selector."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        sel: selectors.BaseSelector,
        max_line: int,
        log: Log,
        short: str,
        events: ChildEvents,
    ) -> None:
        assert proc.stdin and proc.stdout and proc.stderr
        self.proc = proc
        self.sel = sel
        self.max_line = max_line
        self.log = log
        self.short = short
        self.events = events
        self.pidfd = os.pidfd_open(proc.pid)
        self.stdin = proc.stdin.fileno()
        self.stdout = proc.stdout.fileno()
        self.stderr = proc.stderr.fileno()
        self.to_agent = bytearray()
        self.partial = b""
        self.err_partial = b""
        self.discarding = 0  # bytes of an overlong stdout line dropped so far
        self.stdout_open = True
        self.stdin_open = True
        self.closing_stdin = False  # closed once what is still to be written is
        self.exited = False
        self.reading = True
        for fd in (self.stdin, self.stdout, self.stderr):
            os.set_blocking(fd, False)
        try:
            fcntl.fcntl(self.stdout, fcntl.F_SETPIPE_SZ, READ_BYTES)
        except OSError:
            pass  # over the user's allowance for pipes: the default size takes more reads
        sel.register(self.stdout, selectors.EVENT_READ, self._out)
        sel.register(self.stderr, selectors.EVENT_READ, self._err)
        sel.register(self.pidfd, selectors.EVENT_READ, self._gone)

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        cwd: str,
        sel: selectors.BaseSelector,
        max_line: int,
        log: Log,
        short: str,
        events: ChildEvents,
    ) -> AgentChild:
        """Start the agent process; raises OSError when it cannot be started."""
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            bufsize=0,
        )
        return cls(proc, sel, max_line, log, short, events)

    @property
    def ended(self) -> bool:
        """Whether the agent has exited and everything it wrote to stdout was read."""
        return self.exited and not self.stdout_open

    # -- stdout -----------------------------------------------------------------------------

    def _out(self, mask: int) -> None:
        data = _read(self.stdout)
        if data is None:
            return
        if not data:
            self._stdout_closed()
            return
        lines, tail = _split_lines(self.partial, data)
        if self.discarding and lines:
            self._overlong(self.discarding + len(lines[0]) - 1)
            self.discarding = 0
            del lines[0]
        if len(tail) > self.max_line or self.discarding:
            self.discarding += len(tail)
            tail = b""
        self.partial = tail
        if lines:
            if max(map(len, lines)) > self.max_line + 1:
                lines = self._without_overlong(lines)
            self.events.agent_lines(lines)

    def _without_overlong(self, lines: list[bytes]) -> list[bytes]:
        kept = []
        for line in lines:
            if len(line) - 1 > self.max_line:
                self._overlong(len(line) - 1)
            else:
                kept.append(line)
        return kept

    def _overlong(self, size: int) -> None:
        self.log.warn("dropped an agent line over the limit", session=self.short, size=size)
        self.events.agent_dropped("overlong", size)

    def _stdout_closed(self) -> None:
        if self.reading:
            self.sel.unregister(self.stdout)
            self.reading = False
        self.stdout_open = False
        if self.discarding:
            self._overlong(self.discarding)
        elif self.partial:
            self.events.agent_lines([self.partial + b"\n"])
        self.partial = b""
        self.events.agent_changed()

    def pause(self) -> None:
        """Stop reading stdout: the agent blocks once its pipe is full."""
        if self.reading:
            self.sel.unregister(self.stdout)
            self.reading = False

    def resume(self) -> None:
        if not self.reading and self.stdout_open:
            self.sel.register(self.stdout, selectors.EVENT_READ, self._out)
            self.reading = True

    # -- stderr -----------------------------------------------------------------------------

    def _err(self, mask: int) -> None:
        data = _read(self.stderr)
        if data is None:
            return
        if not data:
            self.sel.unregister(self.stderr)
            self._log_rest(b"")
            return
        lines, tail = _split_lines(self.err_partial, data)
        self.err_partial = tail[: self.max_line]
        self._log(lines)

    def _log_rest(self, data: bytes) -> None:
        """The last of stderr, an unterminated line included."""
        lines, tail = _split_lines(self.err_partial, data)
        self.err_partial = b""
        self._log([*lines, tail + b"\n"])

    def _log(self, lines: list[bytes]) -> None:
        """The agent's stderr (lines with their newlines): into the holder's log, and on to
        the holder."""
        lines = [line for line in lines if line.strip()]
        if not lines:
            return
        try:
            os.write(2, b"".join(lines))
        except OSError:
            pass
        _rotate_log()
        self.events.agent_stderr([line[:-1] for line in lines])

    # -- stdin ------------------------------------------------------------------------------

    def send(self, line: bytes) -> None:
        """Write ``line`` to the agent's stdin, as soon as it takes it."""
        if not self.stdin_open:
            return
        self.to_agent += line + b"\n"
        self._write(0)

    def _write(self, mask: int) -> None:
        try:
            written = os.write(self.stdin, self.to_agent)
        except BlockingIOError:
            written = 0
        except OSError:
            self.to_agent.clear()  # the agent is going; its exit is reported
            written = 0
        del self.to_agent[:written]
        key = self.sel.get_map().get(self.stdin)
        if self.to_agent and key is None:
            self.sel.register(self.stdin, selectors.EVENT_WRITE, self._write)
        elif not self.to_agent and key is not None:
            self.sel.unregister(self.stdin)
            if self.closing_stdin:
                self._close_stdin()

    def end_input(self) -> None:
        """Close the agent's stdin once what is pending is written: the CLI's end."""
        self.closing_stdin = True
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self.stdin_open and not self.to_agent:
            self.stdin_open = False
            assert self.proc.stdin is not None
            self._unregister(self.stdin)
            self.proc.stdin.close()

    # -- the process ------------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        if not self.exited:
            try:
                self.proc.send_signal(signum)
            except OSError:
                pass

    def _gone(self, mask: int) -> None:
        if self.proc.poll() is None:
            return
        self.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        self.exited = True
        self.events.agent_changed()

    def release(self) -> tuple[str, int | None]:
        """Once ``ended``: log the rest of stderr, close the pipes, and say how the agent
        ended (a reason, and its exit status unless a signal killed it)."""
        self._log_rest(_read(self.stderr) or b"")
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None and not pipe.closed:
                self._unregister(pipe.fileno())
                pipe.close()
        status = self.proc.returncode
        if status < 0:
            return f"killed by signal {-status}", None
        return f"exited with {status}", status

    def _unregister(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass


def _read(fd: int) -> bytes | None:
    """What the pipe holds (b"" at its end, or when it failed), or None when it is empty."""
    try:
        return os.read(fd, READ_BYTES)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _split_lines(partial: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """``partial + data`` as its complete lines, each with its newline, and the unterminated
    rest. BytesIO finds each newline with memchr, where bytes.split compares byte by byte."""
    lines = io.BytesIO(data).readlines()
    if not lines:
        return [], partial
    if partial:
        lines[0] = partial + lines[0]
    tail = b"" if lines[-1].endswith(b"\n") else lines.pop()
    return lines, tail


def _rotate_log() -> None:
    try:
        if os.fstat(2).st_size <= sessions.LOG_BYTES:
            return
        os.replace(sessions.LOG, sessions.LOG + ".1")
        fd = os.open(sessions.LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass
