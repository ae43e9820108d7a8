"""The usage spool: records Redis has not confirmed, in an fsynced append-only file.

When Redis fails or is slow, a record counts as handled once its line is on disk; the recorder
replays the file in order, through the same idempotent step, once Redis answers again or when
agentd next starts. A file lock keeps two processes out of one spool directory.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from agentd import metrics
from agentd.usage.records import UsageRecord

_log = Logger()

SPOOL_FILE = "usage-spool.jsonl"
SPOOL_LOCK = "usage-spool.lock"

_FAILED = metrics.USAGE_EVENTS.labels("failed")


class SpoolLockedError(RuntimeError):
    """Another agentd process owns this spool directory."""


def default_spool_dir(env: Mapping[str, str], cwd: Path) -> Path:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=), else ``$XDG_STATE_HOME/agentd``, else
    ``var/agentd`` under the working directory."""
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg:
        return Path(xdg) / "agentd"
    return cwd / "var" / "agentd"


class _DaemonThread(threading.Thread):
    """The spool's writer. A daemon, so that a process that never stops its recorder still
    exits; a write cut short then is a crash like any other, and nobody relied on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, daemon=True, **kwargs)


class Spool:
    """Usage records Redis has not confirmed: in memory, and in an fsynced append-only file.

    Writes happen in order on one worker thread (inline without a reactor that has threads),
    so the reactor never waits for the disk; appends queued while a write is in progress are
    written and fsynced together. ``append`` fires once its line is on disk. When every record
    has been applied, the file is truncated. A file lock keeps two processes apart.
    """

    def __init__(self, directory: Path, threads: IReactorThreads | None = None) -> None:
        self.directory = directory
        self.path = directory / SPOOL_FILE
        self.writable = True
        self._threads = threads
        self._pool: ThreadPool | None = None
        self._records: deque[UsageRecord] = deque()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._ops: deque[tuple[bytes | None, Deferred[None]]] = deque()
        self._busy = False
        self._idle: list[Deferred[None]] = []
        self._torn = False

    @property
    def depth(self) -> int:
        return len(self._records)

    def open(self) -> int:
        """Lock the directory and load what a previous process left; returns the count."""
        if self._fd is not None:
            return len(self._records)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(self.directory / SPOOL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolLockedError("used by another agentd process") from None
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._lock_fd, self._fd = lock_fd, fd
        loaded = self._load(data)
        self._records.extendleft(reversed(loaded))
        if self._threads is not None:
            self._pool = ThreadPool(1, 1, "agentd-usage-spool")
            self._pool.threadFactory = _DaemonThread
            self._pool.start()
        return len(loaded)

    def _load(self, data: bytes) -> list[UsageRecord]:
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            # A write the crash cut short: its record() never returned, so nobody relied on it.
            self._torn = True
            _log.warn("usage spool: ignored an incomplete last line in {path}", path=self.path)
        records = []
        for line in lines:
            if not line:
                continue
            try:
                records.append(UsageRecord.from_line(line))
            except (ValueError, TypeError) as e:
                _FAILED.inc()
                _log.error(
                    "usage spool: unreadable line in {path} ({reason}): {line}",
                    path=self.path,
                    reason=str(e),
                    line=line[:4096].decode("utf-8", "replace"),
                )
        return records

    def pending(self, count: int) -> list[UsageRecord]:
        return list(islice(self._records, count))

    def append(self, record: UsageRecord) -> Deferred[None]:
        """Keep ``record``; fires (never fails) once it is on disk or the write has failed."""
        line = record.to_line()
        if self._fd is None:
            try:
                self.open()
            except (OSError, SpoolLockedError) as e:
                self._records.append(record)
                self.writable = False
                _log.critical(
                    "usage spool {path} cannot be opened ({reason}); kept in memory only: {line}",
                    path=self.path,
                    reason=str(e),
                    line=line.decode("utf-8").rstrip(),
                )
                return succeed(None)
        self._records.append(record)
        written: Deferred[None] = Deferred()
        self._ops.append((line, written))
        self._next()
        return written

    def acknowledge(self, count: int) -> None:
        """The oldest ``count`` records are applied; truncate the file once none is left."""
        for _ in range(count):
            self._records.popleft()
        if count and not self._records and self._fd is not None:
            self._ops.append((None, Deferred()))
            self._next()

    def close(self) -> Deferred[None]:
        """Finish queued writes, then release the file and the lock; from then on the file is
        what remains (a later ``append`` opens it again)."""
        idle: Deferred[None] = Deferred()
        if self._busy or self._ops:
            self._idle.append(idle)
        else:
            idle.callback(None)
        idle.addCallback(lambda _: self._release())
        return idle

    def _release(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
        self._records.clear()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def _next(self) -> None:
        if self._busy or not self._ops:
            return
        waiters: list[Deferred[None]] = []
        if self._ops[0][0] is None:
            waiters.append(self._ops.popleft()[1])
            job: Callable[[], None] = self._truncate
            lines: list[bytes] = []
        else:
            lines = []
            while self._ops and self._ops[0][0] is not None:
                line, waiter = self._ops.popleft()
                lines.append(cast(bytes, line))
                waiters.append(waiter)
            job = partial(self._write, b"".join(lines))
        self._busy = True
        if self._pool is not None and self._threads is not None:
            d = deferToThreadPool(self._threads, self._pool, job)
        else:
            d = maybeDeferred(job)
        d.addCallbacks(self._written, self._write_failed, errbackArgs=(lines,))
        d.addBoth(self._settle, waiters)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            self._torn = True
            raise
        self._torn = False

    def _truncate(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self._torn = False

    def _written(self, _: None) -> None:
        self.writable = True

    def _write_failed(self, failure: Failure, lines: list[bytes]) -> None:
        self.writable = False
        if not lines:
            # Harmless for billing: the records it still holds are replayed as duplicates.
            _log.failure("usage spool {path}: truncating failed", failure, path=self.path)
            return
        _log.failure(
            "usage spool {path}: write failed; {count} records kept in memory only: {lines}",
            failure,
            path=self.path,
            count=len(lines),
            lines=b"".join(lines).decode("utf-8").rstrip(),
        )

    def _settle(self, _: None, waiters: list[Deferred[None]]) -> None:
        self._busy = False
        for waiter in waiters:
            waiter.callback(None)
        self._next()
        if not self._busy and not self._ops:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
