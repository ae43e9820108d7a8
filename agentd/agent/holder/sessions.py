"""Where sessions live on the VM: a private directory per user, a subdirectory per session.

The sessions directory is ``--sessions-dir``, else ``$AGENTD_SESSIONS_DIR``, else
``~/.agentd/sessions``: on the VM's disk, so a journal outlives a reboot (``$XDG_RUNTIME_DIR``
is a tmpfs that systemd empties when the user's last login ends). It and every session
directory in it are mode 0700, every file 0600. A session directory holds::

    sock          the holder's unix socket
    start.lock    flock()ed by whoever starts, ends or removes the session's holder
    session.json  the session's identity (see state.py)
    state.jsonl   accepted prompt ids, unrecorded usage, the confirmed seq
    journal/      the numbered lines (see journal.py)
    holder.pid    the holder's process id (its process group too)
    holder.log    the holder's log and the agent's stderr, rotated at LOG_BYTES

Code here works relative to the current directory: holder and attach chdir into the session
directory first, so no path exceeds the 107 bytes a unix socket address may have.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time
from collections.abc import Mapping

from agentd.agent.holder.names import SESSION_ID_RE

SOCKET = "sock"
LOCK = "start.lock"
PID_FILE = "holder.pid"
LOG = "holder.log"
JOURNAL = "journal"
LOG_BYTES = 1 << 20
# Sessions whose holder is gone are removed by the next holder to start, at most this many
# at a time, so a start never waits on a long sweep.
SWEEP_LIMIT = 100


class SessionsError(Exception):
    """The sessions directory cannot be used safely; the message says why."""


def sessions_dir(explicit: str | None, env: Mapping[str, str]) -> str:
    if explicit:
        return os.path.abspath(explicit)
    if env.get("AGENTD_SESSIONS_DIR"):
        return os.path.abspath(env["AGENTD_SESSIONS_DIR"])
    return os.path.join(os.path.expanduser("~"), ".agentd", "sessions")


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and missing parents) as 0700, or check that the existing one is a
    directory of ours, tightening it to 0700."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as e:
        raise SessionsError(f"{path}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise SessionsError(f"{path}: not a directory")
    if info.st_uid != os.getuid():
        raise SessionsError(f"{path}: owned by another user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


def connect() -> socket.socket | None:
    """A connection to the holder of the session in the current directory, or None when no
    holder listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SOCKET)
    except OSError:
        sock.close()
        return None
    return sock


class StartLock:
    """The session's start lock, held while a holder is started, ended or removed.

    flock() on a file that a holder ending at the same moment removed protects nothing, so
    after locking, the file is checked to still be the one at the path.
    """

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        """Lock, waiting up to ``timeout`` seconds. False when the session directory went
        away meanwhile (the caller starts over). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:
                return False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise TimeoutError("the session's start lock is held") from None
                    time.sleep(0.005)
            try:
                same = os.stat(LOCK).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)
            if not os.path.isdir("."):
                return False

    def try_acquire(self) -> bool:
        """Lock without waiting; False when someone else holds it."""
        try:
            fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def has_journal() -> bool:
    return os.path.isdir(JOURNAL) or os.path.exists("state.jsonl")


def sweep(base: str, own: str, max_age: float) -> list[str]:
    """Remove session directories under ``base`` with no live holder and untouched for
    ``max_age`` seconds (a holder lost in a reboot, a session ended with usage nobody
    collected). Returns the ids removed."""
    removed: list[str] = []
    now = time.time()
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        if len(removed) >= SWEEP_LIMIT:
            break
        if name == own or not SESSION_ID_RE.fullmatch(name):
            continue
        path = os.path.join(base, name)
        try:
            if now - _newest_change(path) <= max_age:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _remove_if_unheld(fd, path):
                removed.append(name)
        finally:
            os.close(fd)
    return removed


def _newest_change(path: str) -> float:
    newest = os.stat(path).st_mtime
    for sub in ("state.jsonl", JOURNAL, LOG):
        try:
            newest = max(newest, os.stat(os.path.join(path, sub)).st_mtime)
        except FileNotFoundError:
            pass
    return newest


def _remove_if_unheld(dir_fd: int, path: str) -> bool:
    try:
        lock = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return False
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(f"/proc/self/fd/{dir_fd}/{SOCKET}")
            return False  # a holder answers: alive after all
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                return False
        finally:
            probe.close()
        remove_tree(path)
        return True
    finally:
        os.close(lock)


def remove_tree(path: str) -> None:
    # Imported here: only a holder removes sessions, and the attach path must start fast.
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def remove_current() -> None:
    """Remove the session directory (the current one) under its start lock, so an attach
    starting a new holder at this moment sees either all of it or none."""
    path = os.getcwd()
    lock = StartLock()
    try:
        if not lock.acquire(timeout=5.0):
            return
    except TimeoutError:
        return
    try:
        remove_tree(path)
    finally:
        lock.release()
