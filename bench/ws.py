"""A minimal WebSocket client for load generation: raw sockets, no per-message objects.

Frames from a server are unmasked, so counting them is a walk over two to ten header bytes
each; nothing is decoded unless the caller asks. Both agentd and websocketd are read by the
same code, so the client's own cost is the same on both sides of a comparison.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections import deque

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


def handshake(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """A final, masked client frame."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, size)
    repeated = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        size, "big"
    )
    return head + mask + masked


def split(buffer: bytearray | bytes, start: int = 0) -> tuple[list[tuple[int, int, int]], int]:
    """Complete frames in ``buffer`` from ``start``: (opcode, payload start, payload end) each,
    and where the first incomplete frame begins."""
    frames = []
    pos, end = start, len(buffer)
    while end - pos >= 2:
        size = buffer[pos + 1] & 0x7F
        head = 2
        if size == 126:
            if end - pos < 4:
                break
            size = (buffer[pos + 2] << 8) | buffer[pos + 3]
            head = 4
        elif size == 127:
            if end - pos < 10:
                break
            size = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
            head = 10
        stop = pos + head + size
        if stop > end:
            break
        frames.append((buffer[pos] & 0x0F, pos + head, stop))
        pos = stop
    return frames, pos


class HandshakeError(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class BlockingClient:
    """One connection, read and written from one thread."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(handshake(host, port, path))
        self.buffer = bytearray()
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HandshakeError("connection closed during the handshake")
            self.buffer += chunk
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 101 " not in status:
            raise HandshakeError(status)
        self.buffer = bytearray(rest)
        self.pending: deque[bytes] = deque()
        self.closed = False

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def _read(self) -> None:
        """Move every complete frame out of the buffer, reading once if there were none."""
        frames, used = split(self.buffer)
        if not frames:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
            frames, used = split(self.buffer)
        for opcode, start, stop in frames:
            if opcode == TEXT:
                self.pending.append(bytes(self.buffer[start:stop]))
            elif opcode == PING:
                self.sock.sendall(frame(bytes(self.buffer[start:stop]), PONG))
            elif opcode == CLOSE:
                self.closed = True
        del self.buffer[:used]

    def recv(self) -> bytes:
        """The next text message; pings are answered on the way."""
        while not self.pending:
            if self.closed:
                raise ConnectionError("closed")
            self._read()
        return self.pending.popleft()

    def count_until(self, count: int, confirm_every: int = 0) -> tuple[int, int, bytes]:
        """Read ``count`` text messages as fast as possible: (messages, payload bytes, the
        last message). Frames are walked, never copied, except the last one. With
        ``confirm_every``, every that many messages the client confirms the seq it reached,
        as agent-client.js does, so the session's holder may let the lines go."""
        seen = payload = 0
        last = b""
        while self.pending and seen < count:
            last = self.pending.popleft()
            seen += 1
            payload += len(last)
        if seen >= count:
            return seen, payload, last
        buffer = self.buffer
        recv_into = self.sock.recv_into
        chunk = bytearray(1 << 20)
        view = memoryview(chunk)
        while True:
            frames, used = split(buffer)
            for opcode, start, stop in frames:
                if opcode == TEXT:
                    seen += 1
                    payload += stop - start
                    if seen == count:
                        last = bytes(buffer[start:stop])
                    elif confirm_every and seen % confirm_every == 0:
                        self._confirm(buffer[start : min(stop, start + 32)])
                elif opcode == CLOSE:
                    raise ConnectionError("closed while streaming")
            del buffer[:used]
            if seen >= count:
                return seen, payload, last
            n = recv_into(view)
            if not n:
                raise ConnectionError("closed while streaming")
            buffer += view[:n]

    def _confirm(self, head: bytes | bytearray) -> None:
        if head.startswith(b'{"seq":'):
            seq = int(bytes(head[7:]).split(b",", 1)[0])
            self.send(b'{"type":"confirm","seq":%d}' % seq)

    def close(self) -> None:
        try:
            self.sock.sendall(frame(struct.pack("!H", 1000), CLOSE))
        except OSError:
            pass
        self.sock.close()

    def drop(self) -> None:
        """Vanish like a dead network: reset, no close frame."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class AsyncClient(asyncio.Protocol):
    """One of many connections in an asyncio process: answers pings, queues text messages."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self._request = handshake(host, port, path)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            head, found, rest = bytes(self.buffer).partition(b"\r\n\r\n")
            if not found:
                return
            status = head.split(b"\r\n", 1)[0].decode("latin-1")
            if " 101 " not in status:
                if not self.opened.done():
                    self.opened.set_exception(HandshakeError(status))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.buffer = bytearray(rest)
            self.opened.set_result(None)
        frames, used = split(self.buffer)
        for opcode, start, stop in frames:
            if opcode == TEXT:
                self.received += 1
                self.queue.put_nowait(bytes(self.buffer[start:stop]))
            elif opcode == PING and self.transport is not None:
                self.transport.write(frame(bytes(self.buffer[start:stop]), PONG))
            elif opcode == CLOSE and self.transport is not None:
                self.transport.close()
        del self.buffer[:used]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError("connection closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(payload))

    def drop(self) -> None:
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    async def recv(self, timeout: float) -> bytes:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def open_async(host: str, port: int, path: str, timeout: float = 30.0) -> AsyncClient:
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: AsyncClient(host, port, path), host, port), timeout
    )
    await asyncio.wait_for(client.opened, timeout)
    return client
