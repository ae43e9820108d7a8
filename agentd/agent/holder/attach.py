"""``agentd-agent attach``: connect stdin and stdout to a session's holder, starting it if asked.

This is what agentd runs on the VM (over SSH, or locally) instead of the agent itself. It
finds the session's holder by its socket, sends the hello, and then only relays bytes:
stdin to the holder, the holder to stdout. It exits when stdin closes or the holder goes
away; the holder and its agent live on.

With ``--start``, a session with no live holder gets one: a new session, or one whose holder
was lost (it carries on from the journal). ``--start-only`` does that and, instead of
relaying, says ``listening`` and exits: agentd then connects to the holder's socket itself.
Without either, a session whose holder is gone is served from its journal by the attach
itself, ending with ``ended``. Two attaches starting the same session at once start one
holder: starting happens under the session's start lock.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from agentd.agent.holder import names, sessions, spawn, wire
from agentd.agent.holder.state import Identity, read_identity, write_identity

if TYPE_CHECKING:
    from agentd.agent.holder.journal import Journal, Position

N = TypeVar("N", int, float)

USAGE = (
    "agentd-agent attach --session ID --user USER --project PROJECT --agent AGENT "
    "[--after SEQ] [--start | --start-only] [options]"
)
DEFAULT_AGENT_COMMAND = "agentd-agent {agent}"
DEFAULT_IDLE_SECONDS = 3600.0
DEFAULT_JOURNAL_BYTES = 64 << 20
DEFAULT_JOURNAL_AGE = 86400.0
DEFAULT_MAX_LINE = 1 << 20
LOCK_SECONDS = 15.0
REPLACE_SCAN = 1000
RELAY_BYTES = 256 * 1024


# Every option that takes a value; ``--start`` and ``--start-only`` are the flags without one.
OPTIONS = (
    "--session",
    "--user",
    "--project",
    "--agent",
    "--after",
    "--sessions-dir",
    "--agent-command",
    "--idle-seconds",
    "--journal-max-bytes",
    "--journal-max-age",
    "--max-line",
)


class UsageError(Exception):
    """The command line is unusable; the message says how."""


class Options(NamedTuple):
    identity: Identity
    after: int
    start: bool
    start_only: bool
    sessions_dir: str | None
    agent_command: str
    idle_seconds: float
    journal_max_bytes: int
    journal_max_age: float
    max_line: int


def parse(argv: list[str], env: Mapping[str, str]) -> Options:
    """The command line, checked. Parsed by hand: argparse and what it imports would cost
    every attach several milliseconds."""
    values: dict[str, str] = {}
    start = start_only = False
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        if word in ("--start", "--start-only"):
            start = True
            start_only = start_only or word == "--start-only"
            continue
        name, equals, value = word.partition("=")
        if name not in OPTIONS:
            raise UsageError(f"unknown option {name}")
        if not equals:
            if not rest:
                raise UsageError(f"{name} needs a value")
            value = rest.pop(0)
        if name in values:
            raise UsageError(f"{name} is given twice")
        values[name] = value
    patterns = {
        "--session": names.SESSION_ID_RE,
        "--user": names.USER_RE,
        "--project": names.PROJECT_RE,
        "--agent": names.AGENT_NAME_RE,
    }
    for key, pattern in patterns.items():
        if key not in values:
            raise UsageError(f"{key} is required")
        if not pattern.fullmatch(values[key]):
            raise UsageError(f"{key} is malformed")
    after = names.seq_from_text(values.get("--after", "0"))
    if after is None:
        raise UsageError("--after must be a seq (a non-negative integer)")
    idle_seconds = _number(values, "--idle-seconds", float, DEFAULT_IDLE_SECONDS)
    journal_max_bytes = _number(values, "--journal-max-bytes", int, DEFAULT_JOURNAL_BYTES)
    journal_max_age = _number(values, "--journal-max-age", float, DEFAULT_JOURNAL_AGE)
    max_line = _number(values, "--max-line", int, DEFAULT_MAX_LINE)
    if not idle_seconds > 0:
        raise UsageError("--idle-seconds must be positive")
    if not journal_max_age > 0:
        raise UsageError("--journal-max-age must be positive")
    if not 1024 <= max_line <= 16 << 20:
        raise UsageError("--max-line must be from 1024 to 16777216")
    # Only an attach that starts the holder sizes its journal; the others are given the
    # same attach command without agentd's --max-line, and must not be refused for it.
    if start and journal_max_bytes < 8 * max_line:
        raise UsageError("--journal-max-bytes must be at least 8 times --max-line")
    command = values.get("--agent-command") or env.get("AGENTD_AGENT_COMMAND")
    command = command or DEFAULT_AGENT_COMMAND
    if "{agent}" not in command:
        raise UsageError("--agent-command must contain {agent}")
    return Options(
        identity=Identity(
            values["--session"], values["--user"], values["--project"], values["--agent"]
        ),
        after=after,
        start=start,
        start_only=start_only,
        sessions_dir=values.get("--sessions-dir"),
        agent_command=command,
        idle_seconds=idle_seconds,
        journal_max_bytes=journal_max_bytes,
        journal_max_age=journal_max_age,
        max_line=max_line,
    )


def _number(values: dict[str, str], name: str, kind: type[N], default: N) -> N:
    if name not in values:
        return default
    try:
        return kind(values[name])
    except ValueError:
        raise UsageError(f"{name} must be a number") from None


class Refused(Exception):
    """The attach cannot go ahead: ``code`` and ``text`` go to stdout as a control error."""

    def __init__(self, code: wire.Refusal, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Reached(NamedTuple):
    """A live holder to relay to (and whether this attach started it), or a lost session."""

    sock: socket.socket | None = None
    started: bool = False
    lost: LostSession | None = None


def reach(options: Options, base: str, cwd: str) -> Reached:
    """Connect to the session's holder, starting one (``--start``) when none is live, or
    serve a lost session's journal. Raises Refused."""
    path = os.path.join(base, options.identity.session)
    for _ in range(5):
        try:
            if not os.path.isdir(path):
                if not options.start:
                    raise Refused(wire.Refusal.NO_SESSION, "no such session")
                sessions.ensure_private_dir(path)
            os.chdir(path)
        except FileNotFoundError:
            continue  # removed by its ending holder just now: look again
        except sessions.SessionsError as e:
            raise Refused(wire.Refusal.UNAVAILABLE, str(e)) from None
        sock = sessions.connect()
        if sock is not None:
            return Reached(sock, started=False)
        lock = sessions.StartLock()
        try:
            if not lock.acquire(LOCK_SECONDS):
                continue
        except TimeoutError as e:
            raise Refused(wire.Refusal.UNAVAILABLE, str(e)) from None
        try:
            return _reach_locked(options, base, cwd)
        finally:
            lock.release()
    raise Refused(wire.Refusal.UNAVAILABLE, "the session directory keeps disappearing")


def _reach_locked(options: Options, base: str, cwd: str) -> Reached:
    sock = sessions.connect()  # started by whoever held the lock before us
    if sock is not None:
        return Reached(sock, started=False)
    try:
        stored = read_identity(".")
    except ValueError as e:
        raise Refused(wire.Refusal.UNAVAILABLE, str(e)) from None
    if stored is not None and stored != options.identity:
        raise Refused(
            wire.Refusal.MISMATCH, "the session belongs to another user, project or agent"
        )
    if not options.start:
        if stored is None or not sessions.has_journal():
            raise Refused(wire.Refusal.NO_SESSION, "no such session")
        return Reached(lost=open_lost(options.identity.session, options.after))
    argv = _agent_argv(options)
    if stored is None:
        write_identity(".", options.identity)
    problem = spawn.start_holder(spawn.holder_argv(options, base, cwd, argv))
    if problem is not None:
        raise Refused(wire.Refusal.UNAVAILABLE, problem)
    sock = sessions.connect()
    if sock is None:
        raise Refused(wire.Refusal.UNAVAILABLE, "the session holder is not listening")
    if stored is None:
        replace_others(base, options.identity)
    return Reached(sock, started=True)


def replace_others(base: str, identity: Identity) -> None:
    """A new session replaces the user's earlier ones with the same project and agent,
    whichever agentd holds them: each live one is attached to (so its attach, on any agentd,
    is superseded and its client closed with 4001) and told to end. Looks at the first
    REPLACE_SCAN entries of the sessions directory; the current directory is the new
    session's, so each socket is named relative to it, short enough for any address."""
    try:
        entries = os.listdir(base)[:REPLACE_SCAN]
    except OSError:
        return
    for name in entries:
        if name == identity.session or not names.SESSION_ID_RE.fullmatch(name):
            continue
        try:
            other = read_identity(os.path.join(base, name))
        except ValueError:
            continue
        if other is None or other._replace(session=identity.session) != identity:
            continue
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(1.0)
        try:
            sock.connect(os.path.join("..", name, sessions.SOCKET))
            sock.sendall(wire.hello(*other, after=0, started=False) + wire.encode({"type": "end"}))
        except OSError:
            pass  # no live holder: it ends on its own, or is swept
        finally:
            sock.close()


def _agent_argv(options: Options) -> list[str]:
    """The agent command with its program found: on PATH, or next to this Python (a
    virtualenv that was never activated). Raises Refused when it is nowhere."""
    import shlex
    import shutil

    agent = options.identity.agent
    try:
        argv = [part.replace("{agent}", agent) for part in shlex.split(options.agent_command)]
    except ValueError as e:
        raise Refused(wire.Refusal.BAD_REQUEST, f"--agent-command: {e}") from None
    found = shutil.which(argv[0]) or shutil.which(argv[0], path=os.path.dirname(sys.executable))
    if found is None:
        raise Refused(wire.Refusal.UNAVAILABLE, f"{argv[0]}: command not found")
    return [os.path.abspath(found), *argv[1:]]


def open_lost(session: str, after: int) -> LostSession:
    """Open a session whose holder is gone, under the start lock: its journal gets an
    ``agent_exited`` line unless it already ends with one, and the files are opened, so the
    lines can be read after the lock is released (a holder starting meanwhile only adds
    segments or deletes ones already opened here)."""
    from agentd.agent.holder.journal import Journal
    from agentd.agent.holder.state import State

    journal = Journal(sessions.JOURNAL, 1 << 62, float("inf"))
    state = State(".")
    journal.advance(max(state.confirmed, after))
    last = journal.last_line()
    if last is None or not wire.is_agent_exited(last):
        seq = journal.last_seq + 1
        line = wire.numbered(wire.agent_exited("session holder lost", None), seq)
        journal.append(line, seq, seq)
    position, complete = journal.locate(after)
    journal.open_readers()
    head = wire.encode(
        {
            "type": "attached",
            "v": wire.VERSION,
            "session": session,
            "lastSeq": journal.last_seq,
            "complete": complete,
            "started": False,
            "live": False,
            "agentPid": None,
            "holderPid": None,
            "keySource": None,  # nobody left to say; each unrecorded record says its own
        }
    )
    head += b"".join(wire.encode({"type": "unrecorded", **u}) for u in state.unrecorded.values())
    tail = wire.encode({"type": "ended", "reason": state.ended or "session holder lost"})
    state.close()
    return LostSession(journal, position, head, tail)


class LostSession:
    """A session whose holder is gone, opened by ``open_lost``, served by ``replay``."""

    def __init__(self, journal: Journal, position: Position, head: bytes, tail: bytes) -> None:
        self.journal = journal
        self.position = position
        self.head = head
        self.tail = tail

    def replay(self) -> None:
        """``attached``, the unrecorded usage, every line after the client's seq, ``ended``."""
        journal, position = self.journal, self.position
        try:
            if not write_all(1, self.head):
                return
            while not journal.at_end(position):
                data, position = journal.read(position, RELAY_BYTES)
                if not write_all(1, data):
                    return
            write_all(1, self.tail)
        finally:
            journal.close()


def write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data``, waiting while ``fd`` is full; False when the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:
            return False
    return True


def relay(sock: socket.socket, hello: bytes) -> int:
    """Send the hello, then copy stdin to the holder and the holder to stdout until either
    ends. Exit status 1 when the holder refused the attach, else 0."""
    try:
        sock.sendall(hello)
    except OSError:
        return _refuse(wire.Refusal.UNAVAILABLE, "the session holder went away")
    threading.Thread(target=_pump_stdin, args=(sock,), name="stdin", daemon=True).start()
    first = True
    refused = False
    while True:
        try:
            data = sock.recv(RELAY_BYTES)
        except OSError:
            break
        if not data:
            break
        if first:
            first = False
            refused = data.startswith(b'{"type":"error"')
        if not write_all(1, data):
            break
    return 1 if refused else 0


def _pump_stdin(sock: socket.socket) -> None:
    while True:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            # stdin shares its open file with a non-blocking stdout (a socketpair).
            select.select([0], [], [])
            continue
        except OSError:
            data = b""
        if not data:
            break
        try:
            sock.sendall(data)
        except OSError:
            break
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _refuse(code: wire.Refusal, text: str) -> int:
    write_all(1, wire.refusal(code, text))
    return 1


def main(argv: list[str]) -> int:
    os.umask(0o077)
    try:
        options = parse(argv, os.environ)
    except UsageError as e:
        write_all(2, f"usage: {USAGE}\n{e}\n".encode())
        write_all(1, wire.refusal(wire.Refusal.BAD_REQUEST, str(e)))
        return 2
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = os.path.expanduser("~")
    base = sessions.sessions_dir(options.sessions_dir, os.environ)
    try:
        sessions.ensure_private_dir(base)
        reached = reach(options, base, cwd)
    except sessions.SessionsError as e:
        return _refuse(wire.Refusal.UNAVAILABLE, str(e))
    except Refused as e:
        return _refuse(e.code, e.text)
    if reached.lost is not None:
        reached.lost.replay()
        return 0
    assert reached.sock is not None
    if options.start_only:
        reached.sock.close()
        write_all(1, wire.encode({"type": "listening", "started": reached.started}))
        return 0
    hello = wire.hello(*options.identity, after=options.after, started=reached.started)
    return relay(reached.sock, hello)
