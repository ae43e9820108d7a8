"""Writing to a socket or a pipe at once when nothing waits to be written before.

Twisted's ``write`` never writes: it queues the bytes, asks the reactor to watch the
descriptor for writability (an ``epoll_ctl``), and writes on the reactor's next pass, then
stops watching (another ``epoll_ctl``). For a relay that answers each line as it comes, that is
a second trip through the reactor for every message: one prompt makes two such writes to the
client and two to its attach's pipe. ``write_now`` writes at once when the transport's queue is
empty, as Twisted itself would on its next pass, and queues what the kernel did not take (and
everything else) the way ``write`` does, so the order of the bytes, backpressure and the
handling of a lost connection stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.process import ProcessWriter
from twisted.internet.tcp import Connection


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport`` (a TCP or UNIX connection, or a pipe to a child) at once
    if nothing is queued before it; any other transport queues it as ``write`` does."""
    if (
        isinstance(transport, Connection | ProcessWriter)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        written = transport.writeSomeData(data)
        if isinstance(written, int) and written > 0:
            if written == len(data):
                return
            data = data[written:]
        # Nothing written (the kernel's buffer is full) or the connection is lost: ``write``
        # queues the rest, and the reactor's next pass writes it or reports the loss.
    transport.write(data)
