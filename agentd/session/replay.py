"""The replay log: the frames a client missed, and the seq envelope every kept frame has."""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson


class ReplayLog:
    """The most recent frames, bounded by count and bytes, oldest dropped first."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._frames: deque[tuple[int, bytes]] = deque()
        self._bytes = 0

    def append(self, seq: int, frame: bytes) -> None:
        frames = self._frames
        frames.append((seq, frame))
        self._bytes += len(frame)
        if len(frames) > self._max_messages or self._bytes > self._max_bytes:
            while len(frames) > self._max_messages or (
                self._bytes > self._max_bytes and len(frames) > 1
            ):
                self._bytes -= len(frames.popleft()[1])

    def since(self, last_seq: int, current_seq: int) -> tuple[list[bytes], bool]:
        """Frames with seq > last_seq, and whether that is all of them."""
        if last_seq >= current_seq:
            return [], True
        first = self._frames[0][0] if self._frames else current_seq + 1
        complete = last_seq + 1 >= first
        start = max(0, last_seq + 1 - first)
        frames = [frame for _, frame in list(self._frames)[start:]]
        return frames, complete

    @property
    def size(self) -> int:
        return self._bytes


def encode_frame(message: dict[str, Any]) -> bytes:
    """A message as a frame to keep: orjson returns its bytes in a buffer of at least 4 KiB,
    which would make each small message in the replay log cost that much."""
    return bytes(memoryview(orjson.dumps(message)))


def splice_seq(line: bytes, seq: int, obj: dict[str, Any]) -> bytes:
    """The agent's line with ``seq`` added, without re-encoding it when that is safe."""
    if "seq" in obj or not obj:
        obj["seq"] = seq
        return encode_frame(obj)
    if line[0] == 123 and line[-1] == 125:  # "{...}", as agents write it: no stripping
        return b'{"seq":%d,' % seq + line[1:]
    body = line.lstrip()[1:]
    return b'{"seq":%d,%s' % (seq, body.strip())
