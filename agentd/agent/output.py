"""stdout as a stream of protocol lines, written before the event loop waits, with backpressure.

On a pipe, socket or terminal, stdout is an asyncio write transport. The lines written in one
step of the event loop reach the kernel together, at the end of that step: an answer that
comes whole (a `start`, a `delta` and a `done`) is one write, so one wake-up and one read for
whoever relays it, not three. What the reader has not taken yet is buffered, and ``drain()``
waits while that buffer is over its high-water mark. The event loop keeps running meanwhile,
so an ``abort`` or SIGTERM is acted on even while agentd holds the stream back. Other stdout
files (a regular file) get blocking writes.
"""

from __future__ import annotations

import abc
import asyncio
import os
import stat
from collections.abc import Callable
from typing import Any

from agentd.agent.protocol import encode

# Large enough to batch a fast stream into few syscalls, small enough to notice an abort soon.
HIGH_WATER_BYTES = 256 * 1024


class Output(abc.ABC):
    """Protocol lines to the peer; ``on_lost`` is called once if the peer stops reading."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Hand ``data`` to the kernel by the end of this step of the event loop, or buffer
        what it does not take yet."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait while the buffer is over its high-water mark (the peer reads slowly)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until everything written so far has reached the kernel (or the peer is gone)."""

    def line(self, message: dict[str, Any]) -> None:
        self.write(encode(message))


class _PipeProtocol(asyncio.BaseProtocol):
    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost
        self.paused = False
        self.lost = False
        self.waiters: list[asyncio.Future[None]] = []

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        self.on_lost()

    def _wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


class PipeOutput(Output):
    def __init__(self, transport: asyncio.WriteTransport, protocol: _PipeProtocol) -> None:
        self.transport = transport
        self.protocol = protocol
        transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)
        # What this step of the event loop wrote; handed to the transport when the step ends.
        self._step: list[bytes] = []
        self._step_bytes = 0

    def write(self, data: bytes) -> None:
        if self.protocol.lost:
            return
        if not self._step:
            asyncio.get_running_loop().call_soon(self._end_step)
        self._step.append(data)
        self._step_bytes += len(data)

    def _end_step(self) -> None:
        if self._step:
            data = b"".join(self._step) if len(self._step) > 1 else self._step[0]
            self._step, self._step_bytes = [], 0
            if not self.protocol.lost:
                self.transport.write(data)

    async def drain(self) -> None:
        if self._step_bytes >= HIGH_WATER_BYTES:
            # A writer that does not yield still meets the reader's backpressure.
            self._end_step()
        if self.protocol.paused and not self.protocol.lost:
            waiter = asyncio.get_running_loop().create_future()
            self.protocol.waiters.append(waiter)
            await waiter

    async def flush(self) -> None:
        self._end_step()
        self.transport.set_write_buffer_limits(high=0)
        await self.drain()


class FileOutput(Output):
    def __init__(self, fd: int, on_lost: Callable[[], None]) -> None:
        self.fd = fd
        self.on_lost = on_lost
        self.lost = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.lost:
            try:
                view = view[os.write(self.fd, view) :]
            except OSError:
                self.lost = True
                self.on_lost()

    async def drain(self) -> None:
        return None

    async def flush(self) -> None:
        return None


async def open_stdout(on_lost: Callable[[], None], fd: int = 1) -> Output:
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(fd, "wb", buffering=0, closefd=False)
        protocol = _PipeProtocol(on_lost)
        transport, _ = await loop.connect_write_pipe(lambda: protocol, pipe)
        return PipeOutput(transport, protocol)
    return FileOutput(fd, on_lost)
