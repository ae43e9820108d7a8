"""A client that floods agentd and never reads: what agentd queues for it stays bounded, echoed
ids are bounded, and a closed connection is freed by reference counting alone."""

from __future__ import annotations

import gc
import socket
import ssl
import subprocess
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from agentd.auth import Principal
from agentd.gateway import PROMPTS_WAITING_MAX, AgentWebSocket, AgentWebSocketFactory
from agentd.ratelimit import Decision
from agentd.route import ConnectionContext
from agentd.session.gate import PromptLimits
from agentd.usage.budgets import BudgetDecision
from bench.ws import split
from tests.harness import base_config, merge, token
from tests.samples import sample
from tests.servers import free_port
from tests.test_session import make
from tests.wsclient import connect

MiB = 1024 * 1024
LONGEST_ID = "i" * 256


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


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
    return [orjson.loads(data[start:end]) for _, start, end in split(data)[0]]


# A ping answered with the longest id agentd echoes, and a message it refuses: each costs
# agentd about as much to answer as the client spent sending it, or ten times that.
FLOOD = (masked_frame(orjson.dumps({"type": "ping", "id": LONGEST_ID})) + masked_frame(b"[]")) * 512


class RawClient:
    """A blocking WebSocket client for a worker thread: it writes masked frames and reads
    nothing after the handshake, like a browser tab that stopped reading."""

    def __init__(self, port: int, tls: bool = False) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock)
        self.sock = sock
        sock.sendall(
            b"GET /projects/demo/agent/echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer %s\r\n\r\n"
            % (port, token().encode())
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)  # one byte at a time: what follows the head stays unread
        assert head.startswith(b"HTTP/1.1 101 "), head

    def flood(self, chunk: bytes, limit: int, stall: float = 1.0) -> int:
        """Send ``chunk`` over and over until ``limit`` bytes are out or a send stalls."""
        self.sock.settimeout(stall)
        sent = 0
        try:
            while sent < limit:
                self.sock.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            pass
        return sent

    def close(self) -> None:
        self.sock.close()


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        await sleep(0.02)
    return condition()


async def flood_then_leave(port: int, limit: int, tls: bool = False) -> int:
    client = await threads.deferToThread(RawClient, port, tls)
    sent = await threads.deferToThread(client.flood, FLOOD, limit)
    client.close()
    return sent


@pytest_twisted.ensureDeferred
async def test_a_client_that_floods_and_never_reads_costs_bounded_memory_freed_on_leaving(
    tmp_path, agentd
):
    gateway = agentd(base_config(tmp_path))
    log_events: list[dict[str, Any]] = []
    gc.disable()  # what a closed connection held must go by reference counting alone
    try:
        await flood_then_leave(gateway.port, 1 * MiB)  # the same path once, for a fair baseline
        assert await until(lambda: not gateway.registry.by_id)
        baseline = rss()
        globalLogPublisher.addObserver(log_events.append)
        client = await threads.deferToThread(RawClient, gateway.port)
        limit = 64 * MiB
        sent = await threads.deferToThread(client.flood, FLOOD, limit)
        grown = rss() - baseline
        client.close()
        assert await until(lambda: not gateway.registry.by_id)
        await sleep(0.2)
        left = rss() - baseline
        globalLogPublisher.removeObserver(log_events.append)
    finally:
        gc.enable()
    assert grown < 32 * MiB, f"agentd grew by {grown // MiB} MiB for a client that never reads"
    assert sent < limit, "agentd never stopped reading the client"
    assert left < 8 * MiB, f"{left // MiB} MiB stayed after the client left"
    assert len(log_events) < 20, "a flood of bad messages must not flood the log"

    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "ping", "id": 7})
    assert (await client.recv())["id"] == 7
    client.send({"type": "prompt", "id": "p", "text": "still served"})
    assert (await client.recv_until("done"))[-1]["type"] == "done"
    client.close()


SELF_SIGNED = (
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
    " -subj /CN=localhost"
)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    command = [*SELF_SIGNED.split(), "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return key, cert


async def _close_cleanly(gateway: Any) -> None:
    client = await connect(gateway.ws_url(token=token()))
    await client.recv()
    client.send({"type": "ping", "id": "x"})
    await client.recv()
    client.close()
    await client.closed


async def _take_over(gateway: Any) -> None:
    first = await connect(gateway.ws_url(token=token()))
    hello = await first.recv()
    second = await connect(gateway.ws_url(token=token(), session=hello["session"], last_seq=0))
    await second.recv()
    assert (await first.closed)[0] == 4001
    second.close()
    await second.closed


async def _take_over_from_a_client_that_drops(gateway: Any) -> None:
    first = await threads.deferToThread(RawClient, gateway.port)
    [session_id] = gateway.registry.by_id
    second = await connect(gateway.ws_url(token=token(), session=session_id, last_seq=0))
    await second.recv()
    first.close()  # without answering agentd's close: its timeout is still pending
    second.close()
    await second.closed


async def _drop_with_replies_queued(gateway: Any, tls: bool = False) -> None:
    await flood_then_leave(gateway.port, 16 * MiB, tls)


@pytest.mark.parametrize(
    "ending",
    [
        "client closes",
        "agentd closes, client answers",
        "agentd closes, client drops",
        "client drops",
        "TLS client drops",
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_closed_connection_is_freed_by_reference_counting(tmp_path, agentd, ending):
    config = base_config(tmp_path)
    if ending.startswith("TLS"):
        key, cert = _self_signed(tmp_path)
        endpoint = f"ssl:{free_port()}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        config = merge(config, server={"listen": [endpoint]})
    gateway = agentd(config)
    end = {
        "client closes": _close_cleanly,
        "agentd closes, client answers": _take_over,
        "agentd closes, client drops": _take_over_from_a_client_that_drops,
        "client drops": _drop_with_replies_queued,
        "TLS client drops": lambda gateway: _drop_with_replies_queued(gateway, tls=True),
    }[ending]
    opened: list[weakref.ref[Any]] = []
    original = gateway.registry.open

    def remember(key: Any, client: Any, *args: Any) -> Any:
        opened.append(weakref.ref(client))
        # After a client's unclean TLS EOF, Twisted's TLS layer leaves itself and the socket
        # in a reference cycle (a Failure held by a frame its traceback refers to); what they
        # hold is bounded by the watermark. Over plain TCP the transport must go too.
        if not ending.startswith("TLS"):
            opened.append(weakref.ref(client.transport))
        return original(key, client, *args)

    gateway.registry.open = remember
    gc.disable()
    try:
        await end(gateway)
        freed = await until(lambda: all(ref() is None for ref in opened), seconds=3)
    finally:
        gc.enable()
    assert opened and freed, [ref() for ref in opened]


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


def open_connection(
    registry: Any, limit: int = 4096, max_message_bytes: int = MiB
) -> tuple[AgentWebSocket, QueueingTransport]:
    protocol = AgentWebSocket()
    protocol.factory = AgentWebSocketFactory(registry, max_message_bytes, 0)
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


def test_a_full_queue_stops_reading_and_holds_back_the_rest_of_a_read_until_it_drains():
    _, _, registry = make()
    protocol, transport = open_connection(registry)
    pings = b"".join(masked_frame(b'{"type":"ping","id":%d}' % i) for i in range(500))
    protocol.dataReceived(pings)  # one read of 500 requests
    queued = len(transport.value())
    assert transport.limit < queued < transport.limit + 64, "answers went past the watermark"
    assert transport.producerState == "paused", "agentd kept reading the client"
    answered: list[dict[str, Any]] = []
    for _ in range(500):
        answered += transport.drain()
        if transport.producerState == "producing":
            break
    answered += server_messages(transport.value())
    assert [m["id"] for m in answered] == list(range(500)), "every request answered, in order"
    assert not any("seq" in m for m in answered), "answers to a connection are not numbered"
    assert transport.producerState == "producing", "reading resumed once all was answered"


def test_a_full_queue_pauses_the_agent_once_and_the_client_when_it_sends_until_it_drains():
    _, agents, registry = make()
    protocol, transport = open_connection(registry)
    protocol.dataReceived(masked_frame(b'{"type":"prompt","id":"p","text":"x"}'))
    agent = agents.current
    transport.clear()
    pauses = sample("agentd_flow_pauses_total")
    for _ in range(3):  # the transport asks on every write past its limit
        transport.producer.pauseProducing()
    assert agent.paused and sample("agentd_flow_pauses_total") == pauses + 1
    protocol.dataReceived(masked_frame(b'{"type":"ping","id":1}'))
    assert transport.value() == b"", "answered a client whose queue is full"
    assert transport.producerState == "paused", "kept reading a client whose queue is full"
    assert transport.drain() == [] and not agent.paused
    assert server_messages(transport.value()) == [{"type": "pong", "id": 1}]
    assert transport.producerState == "producing"


class SlowLimiter:
    """A prompt limiter whose decisions arrive when the test says so."""

    def __init__(self) -> None:
        self.asked: list[Deferred[Decision]] = []

    def check_prompt(self, user: str) -> Deferred[Decision]:
        self.asked.append(Deferred())
        return self.asked[-1]


class NoBudgets:
    def check(self, user: str, project: str) -> Deferred[BudgetDecision]:
        return succeed(BudgetDecision(True, None, None, 0.0))


def test_prompts_waiting_for_their_decisions_hold_the_clients_input_at_a_bound():
    limiter = SlowLimiter()
    _, agents, registry = make(gate=PromptLimits(limiter, NoBudgets()))
    protocol, transport = open_connection(registry, limit=MiB)
    prompts = [b'{"type":"prompt","id":"p%d","text":"x"}' % i for i in range(100)]
    protocol.dataReceived(b"".join(masked_frame(p) for p in prompts))
    session = protocol.session
    assert session is not None and session.prompts_waiting == PROMPTS_WAITING_MAX
    assert transport.producerState == "paused", "kept reading while prompts pile up"
    allowed = Decision(allowed=True, policy="prompts", limit=60, window_ms=60_000, retry_after_ms=0)
    decided = 0
    while decided < len(limiter.asked):
        assert session.prompts_waiting <= PROMPTS_WAITING_MAX
        limiter.asked[decided].callback(allowed)
        decided += 1
    assert decided == 100
    acks = [m["id"] for m in server_messages(transport.value()) if m["type"] == "ack"]
    assert acks == [f"p{i}" for i in range(100)], "every prompt acknowledged, in order"
    assert len(agents.current.prompts) == 100
    assert transport.producerState == "producing", "reading resumed once the prompts settled"


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
    assert ping(protocol, transport, echoed) == {"type": "pong", "id": echoed}
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
    assert messages[0] == {"type": "ack", "id": LONGEST_ID, "seq": 1}
    assert messages[-1]["id"] == LONGEST_ID, "the agent took the id too"
    client.close()
