"""The local transport's connection to a session holder's socket, against a real socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

from agentd.transport.local import _HolderConnection, _HolderSockets
from tests.test_ssh_pool_clock import Sink
from tests.waiting import eventually


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.ensureDeferred
async def test_the_holders_socket_carries_lines_both_ways_and_never_takes_a_descriptor(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "holder.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(1)
    sink = Sink()
    holder = _HolderConnection(sink, 1 << 20, b'{"type":"attach"}\n')
    await connectProtocol(UNIXClientEndpoint(_HolderSockets(reactor), path), holder)
    peer, _ = listening.accept()
    peer.settimeout(5)
    try:
        assert peer.recv(100) == b'{"type":"attach"}\n'
        holder.write_line(b'{"type":"prompt","id":"p1","text":"hi"}')
        assert peer.recv(100) == b'{"type":"prompt","id":"p1","text":"hi"}\n'

        # A hostile holder passing descriptors: its lines arrive, its descriptors do not.
        before = open_descriptors()
        read_end, write_end = os.pipe()
        try:
            socket.send_fds(peer, [b'{"seq":1,"type":"start"}\n'], [read_end, write_end])
        finally:
            os.close(read_end)
            os.close(write_end)
        peer.sendall(b'{"seq":2,"type":"done","id":"p1"}\n')
        await eventually(lambda: len(sink.lines) == 2, what="both lines")
        assert sink.lines == [b'{"seq":1,"type":"start"}', b'{"seq":2,"type":"done","id":"p1"}']
        assert open_descriptors() == before

        peer.close()
        await eventually(lambda: sink.ended is not None, what="the end of the connection")
        assert sink.ended == (None, "the session holder's connection closed")
    finally:
        peer.close()
        listening.close()
