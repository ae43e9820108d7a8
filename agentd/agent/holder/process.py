"""The session holder process: its command line, its start in the session directory, its end.

attach.py starts it as ``python -m agentd.agent.holder`` (see __main__.py), fully detached,
and waits on ``--ready-fd`` for "ready" or why it cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from agentd.agent.holder import sessions
from agentd.agent.holder.holder import Holder
from agentd.agent.holder.journal import Journal, Syncer
from agentd.agent.holder.state import STATE_FILE, Identity, State, read_identity
from agentd.agent.log import Log


@dataclass(frozen=True)
class Settings:
    """What the holder runs with, from its command line (see ``parse``)."""

    identity: Identity
    agent_argv: tuple[str, ...]
    cwd: str
    sessions: str
    idle_seconds: float
    journal_max_bytes: int
    journal_max_age: float
    max_line: int

    @property
    def agent_limit(self) -> int:
        """How far the agent's lines may fill the journal; the rest is kept for acks, agentd's
        own lines and ``agent_exited``, so those are never refused for the agent's sake."""
        return self.journal_max_bytes - self.journal_max_bytes // 16


def parse(argv: list[str]) -> tuple[Settings, int | None]:
    parser = argparse.ArgumentParser(prog="python -m agentd.agent.holder")
    parser.add_argument("--session", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--sessions-dir", required=True)
    parser.add_argument("--cwd", required=True)
    parser.add_argument("--agent-argv", required=True, type=json.loads)
    parser.add_argument("--idle-seconds", type=float, required=True)
    parser.add_argument("--journal-max-bytes", type=int, required=True)
    parser.add_argument("--journal-max-age", type=float, required=True)
    parser.add_argument("--max-line", type=int, required=True)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    command = args.agent_argv
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        parser.error("--agent-argv: a JSON list of strings")
    settings = Settings(
        identity=Identity(args.session, args.user, args.project, args.agent),
        agent_argv=tuple(command),
        cwd=args.cwd,
        sessions=args.sessions_dir,
        idle_seconds=args.idle_seconds,
        journal_max_bytes=args.journal_max_bytes,
        journal_max_age=args.journal_max_age,
        max_line=args.max_line,
    )
    return settings, args.ready_fd


def serve(settings: Settings, ready: Callable[[str], None]) -> int:
    """Run the holder in the session directory (the current one); ``ready`` is told "ready"
    once attaches can connect, or why the holder cannot run."""
    identity = settings.identity
    log = Log(identity.agent, fd=2, level=os.environ.get("AGENTD_AGENT_LOG_LEVEL", "info"))
    try:
        stored = read_identity(".")
    except ValueError as e:
        ready(f"error: {e}")
        return 1
    if stored != identity:
        ready("error: the session directory belongs to another session")
        return 1
    syncer = Syncer()
    journal = Journal(
        sessions.JOURNAL, settings.journal_max_bytes, settings.journal_max_age, syncer
    )
    took_over = bool(journal.segments) or os.path.exists(STATE_FILE)
    state = State(".", syncer)
    if state.ended is not None:
        state.end(None)
    try:
        os.unlink(sessions.SOCKET)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sessions.SOCKET)
    listener.listen(64)
    listener.setblocking(False)
    holder = Holder(settings, journal, state, listener, syncer, log)
    if took_over:
        holder.take_over()
    try:
        holder.start_agent()
    except OSError as e:
        ready(f"error: cannot start the agent: {e.strerror or e}")
        return 1
    with open(sessions.PID_FILE + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(sessions.PID_FILE + ".tmp", sessions.PID_FILE)
    ready("ready")
    removed = sessions.sweep(settings.sessions, identity.session, settings.journal_max_age)
    if removed:
        log.info("removed abandoned sessions", count=len(removed))
    holder.run()
    holder.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings, ready_fd = parse(sys.argv[1:] if argv is None else argv)

    told = False

    def ready(word: str) -> None:
        nonlocal told
        if ready_fd is not None and not told:
            told = True
            try:
                os.write(ready_fd, word.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass  # the attach that started us is gone; attaches to come will connect

    try:
        os.chdir(os.path.join(settings.sessions, settings.identity.session))
        log_fd = os.open(sessions.LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as e:
        ready(f"error: {e.strerror}")
        return 1
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        return serve(settings, ready)
    except Exception:
        traceback.print_exc()
        ready("error: internal error")
        return 1
