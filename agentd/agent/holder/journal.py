"""A session's journal on disk: its numbered lines, in segment files, bounded by bytes and age.

The journal is a directory of segment files named by the seq of their first line
(``00000000000000000001.jsonl``), each holding complete numbered lines. Lines are appended
with one ``write`` per batch, so a holder killed at any moment loses nothing it journaled;
a ``Syncer`` thread fsyncs them a moment later, so the stream never waits on the disk.

Only segments whose every line the client confirmed are ever deleted: the oldest first,
when the journal needs room or when they are older than ``max_age``. Unconfirmed lines stay
while the session lives; the holder stops reading its agent instead when they fill the bound.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from agentd.agent.holder.wire import seq_of

SEGMENT_RE = re.compile(r"[0-9]{20}\.jsonl")
# Reading backwards for the last line of a segment, this much at a time.
_TAIL_BYTES = 65536


class JournalError(OSError):
    """The journal could not be written (a full or failing disk); nothing was appended."""


@dataclass
class Segment:
    first_seq: int
    last_seq: int
    size: int
    modified: float

    @property
    def name(self) -> str:
        return f"{self.first_seq:020d}.jsonl"


class Position(NamedTuple):
    """A place in the journal: a segment (by its first seq) and a byte offset in it.

    ``Position(seq, 0)`` for a seq that starts no segment means "the first line after seq - 1",
    which stays valid when the segment before it is deleted or the next one not yet written.
    """

    first_seq: int
    offset: int


class Syncer:
    """fsyncs files in a thread of its own, soon after they were written.

    ``dirty(fd)`` asks for ``fd`` to be fsynced; the thread waits ``interval`` seconds to
    gather more writes, then fsyncs each dirty file once. A write is therefore on disk
    within ``interval`` plus one fsync. ``retire(fd)`` hands over a file the writer is done
    with: it is fsynced and closed by the thread, never by the writer, so a file descriptor
    is never closed while an fsync of it runs.
    """

    def __init__(self, interval: float = 0.05, fsync: Callable[[int], None] = os.fsync) -> None:
        self.interval = interval
        self._fsync = fsync
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._dirty: dict[int, None] = {}
        self._retired: list[int] = []
        self._stopping = False
        self.syncs = 0
        self._thread = threading.Thread(target=self._run, name="fsync", daemon=True)
        self._thread.start()

    def dirty(self, fd: int) -> None:
        with self._lock:
            if fd in self._dirty:
                return
            self._dirty[fd] = None
        self._wake.set()

    def retire(self, fd: int) -> None:
        with self._lock:
            self._retired.append(fd)
        self._wake.set()

    def stop(self) -> None:
        """Sync everything outstanding, then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if not self._stopping:
                time.sleep(self.interval)
            with self._lock:
                self._wake.clear()
                dirty, self._dirty = list(self._dirty), {}
                retired, self._retired = self._retired, []
            for fd in dirty:
                self._sync(fd)
            for fd in retired:
                self._sync(fd)
                os.close(fd)
            if self._stopping:
                with self._lock:
                    if not self._dirty and not self._retired:
                        return

    def _sync(self, fd: int) -> None:
        try:
            self._fsync(fd)
        except OSError:
            # A failing disk shows up again at the next write, which the holder reports.
            pass
        self.syncs += 1


class Journal:
    """The numbered lines of one session, in the segment files of ``directory``."""

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        max_age: float,
        syncer: Syncer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        # Deleting whole segments, the journal frees room in steps of this size.
        self.segment_bytes = max(4096, max_bytes // 16)
        self._syncer = syncer
        self._clock = clock
        self.segments: list[Segment] = []
        self._keys: list[int] = []  # first_seq of each segment, for bisect
        self.total = 0
        self.last_seq = 0
        self._fd: int | None = None  # the active (last) segment, open for appending
        self._readers: dict[int, int] = {}  # first_seq -> read-only fd
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self._recover()

    # -- opening --------------------------------------------------------------------------

    def _recover(self) -> None:
        """Load the segments a previous holder left, dropping a torn last line."""
        names = sorted(n for n in os.listdir(self.directory) if SEGMENT_RE.fullmatch(n))
        for name in names:
            path = os.path.join(self.directory, name)
            info = os.stat(path)
            last = self._last_good_line(path, info.st_size)
            if last is None:
                os.unlink(path)
                continue
            seq, size = last
            self.segments.append(Segment(int(name[:20]), seq, size, info.st_mtime))
        self._keys = [s.first_seq for s in self.segments]
        self.total = sum(s.size for s in self.segments)
        if self.segments:
            self.last_seq = self.segments[-1].last_seq

    def _last_good_line(self, path: str, size: int) -> tuple[int, int] | None:
        """The seq of the last whole numbered line and the size up to its end; a torn or
        garbled tail (a crash in mid-write) is cut off the file."""
        fd = os.open(path, os.O_RDWR)
        try:
            end = size
            while end > 0:
                start, line = _line_before(fd, end)
                seq = _seq_if_whole(line) if os.pread(fd, 1, end - 1) == b"\n" else None
                if seq is not None:
                    if end != size:
                        os.ftruncate(fd, end)
                        os.fsync(fd)
                    return seq, end
                end = start
            return None
        finally:
            os.close(fd)

    # -- writing --------------------------------------------------------------------------

    def append(self, data: bytes, first_seq: int, last_seq: int) -> None:
        """Append complete numbered lines ``first_seq``..``last_seq`` (``data`` ends with a
        newline). Raises JournalError, having appended nothing, when the disk refuses."""
        segment = self.segments[-1] if self.segments and self._fd is not None else None
        if segment is None or segment.size >= self.segment_bytes:
            segment = self._roll(first_seq)
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            try:
                os.ftruncate(fd, segment.size)
            except OSError:
                pass
            raise JournalError(e.errno, e.strerror) from None
        segment.size += len(data)
        segment.last_seq = last_seq
        segment.modified = self._clock()
        self.total += len(data)
        self.last_seq = last_seq
        if self._syncer is None:
            os.fsync(fd)
        else:
            self._syncer.dirty(fd)

    def advance(self, seq: int) -> None:
        """Number on after ``seq``: the next line appended gets a seq above it."""
        self.last_seq = max(self.last_seq, seq)

    def _roll(self, first_seq: int) -> Segment:
        self._retire_writer()
        segment = Segment(first_seq, first_seq - 1, 0, self._clock())
        path = os.path.join(self.directory, segment.name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        except OSError as e:
            raise JournalError(e.errno, e.strerror) from None
        self._fd = fd
        self.segments.append(segment)
        self._keys.append(first_seq)
        # The new name must reach the disk too, or a synced segment could be unfindable.
        if self._syncer is None:
            os.fsync(self._dir_fd)
        else:
            self._syncer.dirty(self._dir_fd)
        return segment

    def _retire_writer(self) -> None:
        if self._fd is None:
            return
        if self._syncer is None:
            os.fsync(self._fd)
            os.close(self._fd)
        else:
            self._syncer.retire(self._fd)
        self._fd = None

    def trim(
        self, confirmed: int, keep: Position | None, need: int = 0, bound: int | None = None
    ) -> None:
        """Delete the oldest segments whose lines are all confirmed and that ``keep`` (an
        attach's place) is past, while the journal plus ``need`` bytes is over ``bound``
        (``max_bytes`` unless given) or they are older than ``max_age``."""
        limit = self.max_bytes if bound is None else bound
        now = self._clock()
        while self._deletable(confirmed, keep):
            segment = self.segments[0]
            if self.total + need <= limit and now - segment.modified <= self.max_age:
                break
            self._delete_first()

    def next_expiry(self, confirmed: int, keep: Position | None) -> float | None:
        """The wall-clock time at which ``trim`` will delete the oldest segment for its age,
        or None while that segment cannot be deleted at all."""
        if not self._deletable(confirmed, keep):
            return None
        return self.segments[0].modified + self.max_age + 1

    def _deletable(self, confirmed: int, keep: Position | None) -> bool:
        """Whether the oldest segment may go: all its lines confirmed, ``keep`` past it."""
        if not self.segments or self.segments[0].last_seq > confirmed:
            return False
        return keep is None or self._index(keep) > 0

    def _delete_first(self) -> None:
        segment = self.segments.pop(0)
        self._keys.pop(0)
        if not self.segments:
            self._retire_writer()
        reader = self._readers.pop(segment.first_seq, None)
        if reader is not None:
            os.close(reader)
        try:
            os.unlink(os.path.join(self.directory, segment.name))
        except FileNotFoundError:
            pass
        self.total -= segment.size

    # -- reading --------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        """The oldest seq still in the journal (last_seq + 1 when it is empty)."""
        return self.segments[0].first_seq if self.segments else self.last_seq + 1

    def end(self) -> Position:
        """Where the next appended line will be."""
        if self._fd is not None:
            active = self.segments[-1]
            return Position(active.first_seq, active.size)
        return Position(self.last_seq + 1, 0)

    def at_end(self, position: Position) -> bool:
        return self._index(position) >= len(self.segments)

    def _index(self, position: Position) -> int:
        """The index of the segment ``position`` reads next; len(segments) at the end."""
        key, offset = position
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            if offset >= self.segments[i].size:
                return i + 1
            return i
        return i

    def normal(self, position: Position) -> Position:
        """``position``, moved off the end of a segment to the start of what follows it."""
        i = self._index(position)
        if i >= len(self.segments):
            return self.end()
        if self.segments[i].first_seq != position.first_seq:
            return Position(self.segments[i].first_seq, 0)
        return position

    def locate(self, after: int) -> tuple[Position, bool]:
        """Where the first line with seq > ``after`` is (or will be), and whether every line
        after ``after`` is still in the journal."""
        if after >= self.last_seq:
            return self.end(), True
        complete = after >= self.first_seq - 1
        i = bisect.bisect_right(self._keys, after + 1) - 1
        if i < 0:
            return Position(self.segments[0].first_seq, 0), complete
        segment = self.segments[i]
        if segment.last_seq <= after:
            return self.normal(Position(segment.first_seq, segment.size)), complete
        data = os.pread(self._reader(segment), segment.size, 0)
        return Position(segment.first_seq, _first_line_after(data, after)), complete

    def read(self, position: Position, limit: int) -> tuple[bytes, Position]:
        """Up to ``limit`` bytes of whole lines from ``position`` (fewer at a segment's end),
        and the position after them."""
        i = self._index(position)
        if i >= len(self.segments):
            return b"", self.end()
        segment = self.segments[i]
        offset = position.offset if segment.first_seq == position.first_seq else 0
        size = min(limit, segment.size - offset)
        data = os.pread(self._reader(segment), size, offset)
        if len(data) == size < segment.size - offset:
            # Cut at the last whole line; a line longer than ``limit`` goes out whole.
            cut = data.rfind(b"\n") + 1
            if cut:
                data = data[:cut]
            else:
                rest = os.pread(self._reader(segment), segment.size - offset, offset)
                data = rest[: rest.index(b"\n") + 1]
        return data, self.normal(Position(segment.first_seq, offset + len(data)))

    def last_line(self) -> bytes | None:
        if not self.segments:
            return None
        segment = self.segments[-1]
        return _line_before(self._reader(segment), segment.size)[1]

    def open_readers(self) -> None:
        """Open every segment for reading now: what is open stays readable after a delete."""
        for segment in self.segments:
            self._reader(segment)

    def _reader(self, segment: Segment) -> int:
        fd = self._readers.get(segment.first_seq)
        if fd is None:
            fd = os.open(os.path.join(self.directory, segment.name), os.O_RDONLY)
            self._readers[segment.first_seq] = fd
        return fd

    def close(self) -> None:
        self._retire_writer()
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()
        if self._syncer is None:
            os.close(self._dir_fd)
        else:
            self._syncer.retire(self._dir_fd)


def _line_before(fd: int, end: int) -> tuple[int, bytes]:
    """The line that ends at byte ``end`` of the file (without its newline) and its start."""
    chunks: list[bytes] = []
    pos = end - 1 if end else 0  # the byte at end - 1 is that line's newline, when it has one
    while pos > 0:
        start = max(0, pos - _TAIL_BYTES)
        block = os.pread(fd, pos - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            chunks.append(block[newline + 1 :])
            pos = start + newline + 1
            break
        chunks.append(block)
        pos = start
    line = b"".join(reversed(chunks))
    tail = os.pread(fd, 1, end - 1) if end else b""
    if tail != b"\n":
        line += tail
    return pos, line


def _seq_if_whole(line: bytes) -> int | None:
    """The seq of ``line`` when it is a whole numbered line (a JSON object), else None."""
    try:
        seq = seq_of(line)
        obj = json.loads(line)
    except ValueError:
        return None
    return seq if isinstance(obj, dict) else None


def _first_line_after(data: bytes, after: int) -> int:
    """The offset of the first line in ``data`` (whole numbered lines, seq ascending) whose
    seq is greater than ``after``; len(data) when there is none. A binary search."""
    lo, hi = 0, len(data)
    while lo < hi:
        mid = (lo + hi) // 2
        start = data.rfind(b"\n", lo, mid) + 1 if mid > lo else lo
        start = max(start, lo)
        if seq_of(data[start : start + 32]) > after:
            hi = start
        else:
            lo = data.index(b"\n", start) + 1
    return lo
