"""The session holder's attach connections: hello, hand-over, and sending each its lines.

Attaches connect to the holder's socket and say hello; the one whose hello is accepted
becomes the current attach and supersedes the one before. A refused or superseded attach
is dismissed: it gets the line in flight and one last line saying why, then is closed. The
current attach is sent the journal from its cursor on while it keeps up, and ``ended``
once the session is over and it has every line. What its lines ask for is the session's
business (``AttachSession``).
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import time
from typing import Any, Protocol

from agentd.agent.holder import names, sessions, wire
from agentd.agent.holder.journal import Journal, Position
from agentd.agent.holder.state import Identity
from agentd.agent.log import Log
from agentd.agent.protocol import MAX_LINE_BYTES

# An attach's send buffer is refilled from the journal while it holds less than this.
ATTACH_HIGH_WATER = 256 * 1024
ATTACH_READ_BYTES = 256 * 1024
HELLO_SECONDS = 10.0
# After ``ended``, how long the holder still reads ``recorded`` lines from the attach, and
# how long an ending session waits for its attach to catch up to ``ended`` at all.
LINGER_SECONDS = 2.0
FINISH_SECONDS = 10.0
# A superseded or refused attach that does not read its last line is closed after this long.
DISMISS_SECONDS = 5.0
LOG_FORWARD_CHARS = 8192


class Attach:
    """One connection from ``agentd-agent attach``. Once its hello is accepted (``greeted``),
    ``cursor`` says which journal bytes it gets next; None once it has had the last."""

    __slots__ = (
        "cursor",
        "deadline",
        "dismissed",
        "greeted",
        "inbuf",
        "out",
        "sock",
        "unwritable",
        "writing",
    )

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out = bytearray()
        self.greeted = False
        self.cursor: Position | None = None
        self.writing = False
        self.unwritable = False  # it stopped reading; what it sent is still read to the end
        self.dismissed = False  # refused or superseded: its last line goes out, then it closes


class AttachSession(Protocol):
    """What the holder does for the current attach."""

    def welcome(self, attach: Attach, hello: dict[str, Any]) -> None:
        """The attach's hello was accepted: set its cursor and tell it where it is."""

    def received(self, attach: Attach, line: bytes) -> None:
        """A line from the current attach, after its hello."""


class Attaches:
    """The listening socket and every attach: those yet to say hello (``waiting``), the
    ``current`` one, and the ``dismissed`` ones being closed."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        listener: socket.socket,
        journal: Journal,
        identity: Identity,
        log: Log,
        session: AttachSession,
    ) -> None:
        self.sel = sel
        self.listener: socket.socket | None = listener
        self.journal = journal
        self.identity = identity
        self.log = log
        self.session = session
        self.current: Attach | None = None
        self.waiting: list[Attach] = []  # connected, hello not yet received
        self.dismissed: list[Attach] = []  # being closed once their last line is out
        self.ended_reason: str | None = None  # once the session is over
        self.linger_until: float | None = None
        self.over = False  # the last attach of an ended session is done
        sel.register(listener, selectors.EVENT_READ, self._accept)

    @property
    def _short(self) -> str:
        return self.identity.session[:8]

    # -- time -------------------------------------------------------------------------------

    def deadlines(self) -> list[float]:
        deadlines = [a.deadline for a in (*self.waiting, *self.dismissed)]
        if self.linger_until is not None:
            deadlines.append(self.linger_until)
        return deadlines

    def tick(self, now: float) -> None:
        for attach in [a for a in self.waiting if a.deadline <= now]:
            self.close(attach, wire.refusal(wire.Refusal.BAD_REQUEST, "no hello"))
        for attach in [a for a in self.dismissed if a.deadline <= now]:
            self.close(attach)

    def linger_over(self, now: float) -> None:
        if self.linger_until is not None and now >= self.linger_until:
            self.over = True

    # -- coming in --------------------------------------------------------------------------

    def _accept(self, mask: int) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        attach = Attach(sock, time.monotonic() + HELLO_SECONDS)
        self.waiting.append(attach)
        self.sel.register(sock, selectors.EVENT_READ, lambda mask: self._ready(attach, mask))

    def _ready(self, attach: Attach, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush(attach)
            if attach.sock.fileno() < 0:
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = attach.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(attach)
            return
        if attach.dismissed:
            return
        attach.inbuf += data
        while attach.sock.fileno() >= 0:
            newline = attach.inbuf.find(b"\n")
            if newline < 0:
                if len(attach.inbuf) > MAX_LINE_BYTES:
                    self.close(attach, wire.refusal(wire.Refusal.BAD_REQUEST, "line too long"))
                return
            line = bytes(attach.inbuf[:newline])
            del attach.inbuf[: newline + 1]
            if not attach.greeted:
                self._hello(attach, line)
            elif attach is self.current:
                self.session.received(attach, line)

    def _hello(self, attach: Attach, line: bytes) -> None:
        problem = _hello_problem(line)
        if problem is not None:
            self.close(attach, wire.refusal(wire.Refusal.BAD_REQUEST, problem))
            return
        hello = json.loads(line)
        claimed = Identity(hello["session"], hello["user"], hello["project"], hello["agent"])
        if claimed != self.identity:
            self.log.warn("attach refused: another user, project or agent", session=self._short)
            self.close(
                attach,
                wire.refusal(
                    wire.Refusal.MISMATCH, "the session belongs to another user, project or agent"
                ),
            )
            return
        if self.listener is None:
            self.close(attach, wire.refusal(wire.Refusal.ENDING, "the session is ending"))
            return
        self.waiting.remove(attach)
        attach.greeted = True
        previous, self.current = self.current, attach
        if previous is not None:
            self.close(previous, wire.encode({"type": "superseded"}))
        self.session.welcome(attach, hello)

    # -- going out --------------------------------------------------------------------------

    def send(self, attach: Attach, line: bytes) -> None:
        attach.out += line
        self.flush(attach)

    def forward_log(self, lines: list[bytes]) -> None:
        """The agent's stderr, sent on as ``log`` lines unless the current attach is behind."""
        attach = self.current
        if attach is not None and len(attach.out) < ATTACH_HIGH_WATER:
            for line in lines:
                text = line[:LOG_FORWARD_CHARS].decode("utf-8", "replace")
                attach.out += wire.encode({"type": "log", "line": text})
            self.flush(attach)

    def forward_dropped(self, reason: str, size: int) -> None:
        """A ``dropped`` line for agentd's count of bad agent lines, unless the attach is
        behind (the holder's log has every one)."""
        attach = self.current
        if attach is not None and len(attach.out) < ATTACH_HIGH_WATER:
            attach.out += wire.encode({"type": "dropped", "reason": reason, "size": size})
            self.flush(attach)

    def caught_up(self) -> Attach | None:
        """The current attach if it has every journaled line and room for more: lines about
        to be journaled can be handed to it as they are."""
        attach = self.current
        if (
            attach is not None
            and attach.cursor is not None
            and len(attach.out) < ATTACH_HIGH_WATER
            and self.journal.at_end(attach.cursor)
        ):
            return attach
        return None

    def relay(self, data: bytes, caught_up: Attach | None) -> None:
        """``data`` was just journaled: on to the current attach (see ``caught_up``)."""
        attach = self.current
        if attach is None or attach.cursor is None:
            return
        if attach is caught_up:
            attach.cursor = self.journal.end()
            if not attach.out and not attach.unwritable:
                # Sent as it is, only what the socket does not take is copied to ``out``.
                try:
                    data = data[attach.sock.send(data) :]
                except OSError:
                    pass  # a full socket waits in ``out``; flush deals with the others
            attach.out += data
        self.flush(attach)

    def flush(self, attach: Attach) -> None:
        """Send what the attach has pending, refilling from the journal while it keeps up."""
        sock = attach.sock
        if attach.unwritable or sock.fileno() < 0:
            attach.out.clear()
            if attach.dismissed:
                self.close(attach)
            return
        while True:
            if attach.out:
                try:
                    sent = sock.send(attach.out)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    # Gone, or only its reading side: lines it sent before going (a
                    # ``recorded``, a ``confirm``) are still read, up to its end of file.
                    attach.unwritable = True
                    attach.out.clear()
                    break
                del attach.out[:sent]
                if attach.out:
                    break
            cursor = attach.cursor
            if cursor is None:
                break
            if self.journal.at_end(cursor):
                if self.ended_reason is None or attach is not self.current:
                    break
                # The session is over and this attach has every line: the last word.
                attach.cursor = None
                attach.out += wire.encode({"type": "ended", "reason": self.ended_reason})
                if self.linger_until is not None:
                    self.linger_until = min(self.linger_until, time.monotonic() + LINGER_SECONDS)
                continue
            data, attach.cursor = self.journal.read(cursor, ATTACH_READ_BYTES)
            attach.out += data
        if attach.dismissed and (attach.unwritable or not attach.out):
            self.close(attach)
            return
        writing = bool(attach.out)
        if writing != attach.writing:
            attach.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self.sel.modify(sock, events, self.sel.get_key(sock).data)

    # -- going away -------------------------------------------------------------------------

    def close(self, attach: Attach, last: bytes = b"") -> None:
        """Close an attach; with ``last``, only once the line in flight and ``last`` are
        sent (or DISMISS_SECONDS passed), so that it learns why."""
        sock = attach.sock
        if sock.fileno() < 0:
            return
        if attach is self.current:
            self.current = None
            if self.linger_until is not None:
                self.over = True
        if attach in self.waiting:
            self.waiting.remove(attach)
        if last and not attach.dismissed:
            attach.dismissed = True
            attach.cursor = None
            del attach.out[attach.out.find(b"\n") + 1 :]
            attach.out += last
            attach.deadline = time.monotonic() + DISMISS_SECONDS
            self.dismissed.append(attach)
            self.flush(attach)
            return
        if attach in self.dismissed:
            self.dismissed.remove(attach)
        self.sel.unregister(sock)
        sock.close()

    def stop(self) -> None:
        """The session is ending: take no more attaches, and tell those yet to say hello."""
        self.stop_listening()
        for attach in list(self.waiting):
            self.close(attach, wire.refusal(wire.Refusal.ENDING, "the session is ending"))

    def stop_listening(self) -> None:
        if self.listener is None:
            return
        self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        try:
            os.unlink(sessions.SOCKET)
        except FileNotFoundError:
            pass

    def finish(self, reason: str) -> bool:
        """The session is over: the current attach gets ``ended`` after its last line and
        then a while for the ``recorded`` lines it owes. False when there is no attach."""
        attach = self.current
        if attach is None:
            return False
        self.ended_reason = reason
        # agentd answers ``ended`` with the ``recorded`` lines it owes, then closes. An
        # attach that does not catch up in FINISH_SECONDS is left behind: the lines stay in
        # the journal only if it is kept.
        self.linger_until = time.monotonic() + FINISH_SECONDS
        self.flush(attach)
        return True

    def close_all(self) -> None:
        for attach in [*self.waiting, *self.dismissed, *([self.current] if self.current else [])]:
            self.close(attach)
        self.stop_listening()


def _hello_problem(line: bytes) -> str | None:
    """What is wrong with a hello line, or None."""
    try:
        hello = json.loads(line)
    except ValueError:
        return "hello: not JSON"
    if not isinstance(hello, dict) or hello.get("type") != "hello":
        return "the first line must be a hello"
    if hello.get("v") != wire.VERSION:
        return f"hello: v must be {wire.VERSION}"
    patterns = {
        "session": names.SESSION_ID_RE,
        "user": names.USER_RE,
        "project": names.PROJECT_RE,
        "agent": names.AGENT_NAME_RE,
    }
    for key, pattern in patterns.items():
        value = hello.get(key)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            return f"hello: {key} is malformed"
    after = hello.get("after")
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= names.MAX_SEQ:
        return "hello: after must be a seq"
    return None
