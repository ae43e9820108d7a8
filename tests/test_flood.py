"""A client that floods agentd: what agentd echoes back is bounded."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet.testing import StringTransport

from agentd.auth import Principal
from agentd.gateway import AgentWebSocket, AgentWebSocketFactory, ConnectionContext
from tests.harness import base_config, token
from tests.test_session import make
from tests.wsclient import connect

MiB = 1024 * 1024
LONGEST_ID = "i" * 256


def masked_frame(payload: bytes) -> bytes:
    """A client's text frame; a zero mask key leaves the payload as it is."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, 0x80 | size))
    elif size < 65536:
        head = bytes((0x81, 0xFE)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0xFF)) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def server_messages(data: bytes) -> list[dict[str, Any]]:
    """The JSON of every whole text frame in what agentd wrote (server frames are unmasked)."""
    messages, at = [], 0
    while at + 2 <= len(data):
        size, at = data[at + 1] & 0x7F, at + 2
        if size == 126:
            size, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        messages.append(orjson.loads(data[at : at + size]))
        at += size
    return messages


# -- in memory: the protocol over a transport that pauses its producer as Twisted's does ------

CONTEXT = ConnectionContext(
    principal=Principal("alice", frozenset({"demo"})),
    project="demo",
    agent="echo",
    session_id=None,
    last_seq=0,
    peer="127.0.0.1",
)
HANDSHAKE = (
    b"GET /projects/demo/agent/echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class QueueingTransport(StringTransport):
    """Asks its producer to pause on every write that leaves more than ``limit`` bytes unsent,
    as Twisted's TCP transport does past its bufferSize; ``drain`` is the kernel taking them."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.limit:
            self.producer.pauseProducing()

    def drain(self) -> list[dict[str, Any]]:
        sent = server_messages(self.value())
        self.clear()
        self.producer.resumeProducing()
        return sent


def open_connection(registry: Any, limit: int = 4096) -> tuple[AgentWebSocket, QueueingTransport]:
    protocol = AgentWebSocket()
    protocol.factory = AgentWebSocketFactory(registry, MiB, 0)
    protocol.context = CONTEXT
    transport = QueueingTransport(limit)
    transport.registerProducer(StringTransport(), True)  # twisted.web's, until the upgrade
    protocol.makeConnection(transport)
    protocol.dataReceived(HANDSHAKE)
    head, _, frames = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert server_messages(frames)[0]["type"] == "session"
    transport.clear()
    return protocol, transport


def ping(protocol: AgentWebSocket, transport: StringTransport, ping_id: Any) -> dict[str, Any]:
    transport.clear()
    protocol.dataReceived(masked_frame(orjson.dumps({"type": "ping", "id": ping_id})))
    [reply] = server_messages(transport.value())
    return reply


@pytest.mark.parametrize(
    ("echoed", "refused"),
    [
        (LONGEST_ID, LONGEST_ID + "i"),
        ("", "i" * 900_000),
        (2**53, 2**53 + 1),
        (-(2**53), -(2**53) - 1),
        (0, 1.5),
        (1, True),
        (7, None),
        (8, [1]),
        (9, {}),
    ],
)
def test_a_ping_id_is_echoed_within_bounds_and_refused_beyond(echoed, refused):
    _, _, registry = make()
    protocol, transport = open_connection(registry, limit=MiB)
    assert ping(protocol, transport, echoed) == {"type": "pong", "id": echoed, "seq": 1}
    reply = ping(protocol, transport, refused)
    assert reply["type"] == "error" and reply["code"] == "bad_request" and "id" not in reply


@pytest_twisted.ensureDeferred
async def test_a_prompt_id_of_256_characters_goes_to_the_agent_and_257_are_refused(
    tmp_path, agentd
):
    gateway = agentd(base_config(tmp_path))
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "prompt", "id": LONGEST_ID + "i", "text": "too long"})
    refused = await client.recv()
    assert refused["code"] == "bad_request" and "256" in refused["error"]
    client.send({"type": "prompt", "id": LONGEST_ID, "text": "longest id"})
    messages = await client.recv_until("done")
    assert messages[0] == {"type": "ack", "id": LONGEST_ID, "seq": 2}
    assert messages[-1]["id"] == LONGEST_ID, "the agent took the id too"
    client.close()
