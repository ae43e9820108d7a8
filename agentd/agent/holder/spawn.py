"""Starting a session holder: fully detached from the attach, and waited for until it listens.

The holder is ``python -m agentd.agent.holder`` (process.py) with the attach's options; it
says "ready", or why it cannot run, on the pipe given as ``--ready-fd``.
"""

from __future__ import annotations

import json
import os
import select
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from agentd.agent.holder.attach import Options

# How long a start may take: the holder loads, recovers its journal and starts the agent.
READY_SECONDS = 10.0


def holder_argv(options: Options, base: str, cwd: str, agent_argv: list[str]) -> list[str]:
    """The holder's command line, for the session and limits the attach was given.

    Every value is joined to its option with ``=``: a session id may begin with ``-``
    (one in 64 does), which argparse would otherwise take for an option of its own.
    """
    identity = options.identity
    values = {
        "--session": identity.session,
        "--user": identity.user,
        "--project": identity.project,
        "--agent": identity.agent,
        "--sessions-dir": base,
        "--cwd": cwd,
        "--agent-argv": json.dumps(agent_argv),
        "--idle-seconds": repr(options.idle_seconds),
        "--journal-max-bytes": str(options.journal_max_bytes),
        "--journal-max-age": repr(options.journal_max_age),
        "--max-line": str(options.max_line),
    }
    return [sys.executable, "-m", "agentd.agent.holder", *(f"{k}={v}" for k, v in values.items())]


def start_holder(argv: list[str]) -> str | None:
    """Start the holder fully detached and wait until it listens; None, or why it did not
    start. The holder is a grandchild in a session of its own (so it never gets a
    controlling terminal, and sshd closing the channel or a SIGHUP do not reach it), leads
    its own process group, and has /dev/null for stdin and stdout."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        _become_holder(argv, read_end, write_end)
    os.close(write_end)
    os.waitpid(pid, 0)
    try:
        reply = b""
        while not reply.endswith(b"\n"):
            ready, _, _ = select.select([read_end], [], [], READY_SECONDS)
            if not ready:
                return "the session holder did not start in time"
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            reply += chunk
    finally:
        os.close(read_end)
    word = reply.decode("utf-8", "replace").strip()
    if word == "ready":
        return None
    return word.removeprefix("error: ") or "the session holder did not start"


def _become_holder(argv: list[str], read_end: int, write_end: int) -> NoReturn:
    try:
        os.close(read_end)
        os.setsid()
        if os.fork():
            os._exit(0)
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        # Every other descriptor (the lock, sockets) is close-on-exec and stays behind.
        os.set_inheritable(write_end, True)
        os.execv(argv[0], [*argv, "--ready-fd", str(write_end)])  # noqa: S606 (no shell wanted)
    finally:
        os._exit(127)
