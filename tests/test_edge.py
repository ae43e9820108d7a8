"""The HTTP edge on a fake clock: head and body deadlines, caps on unauthenticated connections
per process and per client address, and the address a trusted proxy reports."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from agentd import config as config_module
from agentd import metrics
from agentd.clientaddr import ClientAddresses
from agentd.config import ConfigError
from agentd.edge import CLOSE_GRACE_SECONDS, ConnectionLimits, GuardedChannel, authenticated
from agentd.web import AccessLoggingSite

HEAD = b"GET /ok HTTP/1.1\r\nHost: agentd\r\n"


class Ok(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.clients: list[str] = []

    def render(self, request: Request) -> bytes:
        self.clients.append(request.getClientAddress().host)
        return b"ok"


class Slow(Resource):
    """Answers only when the test says so; its requests keep their channels busy."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


class Upgrade(Resource):
    """Stands in for the gateway: an authenticated request leaves HTTP."""

    isLeaf = True

    def render(self, request: Request) -> int:
        authenticated(request)
        return NOT_DONE_YET


class Edge:
    def __init__(
        self,
        *,
        head: float = 10.0,
        body: float = 30.0,
        total: int = 100,
        per_address: int = 100,
        proxies: tuple[str, ...] = (),
        header: str = "",
    ) -> None:
        self.clock = Clock()
        self.limits = ConnectionLimits(
            self.clock,
            head_seconds=head,
            body_seconds=body,
            max_unauthenticated=total,
            max_per_address=per_address,
            addresses=ClientAddresses(proxies, header),
        )
        root = Resource()
        self.ok, self.slow = Ok(), Slow()
        root.putChild(b"ok", self.ok)
        root.putChild(b"slow", self.slow)
        root.putChild(b"upgrade", Upgrade())
        self.site = AccessLoggingSite(root, self.limits)
        self._port = 40000

    def connect(self, host: str = "192.0.2.1") -> tuple[GuardedChannel | None, StringTransport]:
        self._port += 1
        peer = IPv4Address("TCP", host, self._port)
        transport = StringTransport(peerAddress=peer)
        channel = self.site.buildProtocol(peer)
        if channel is not None:
            channel.makeConnection(transport)
        return channel, transport


def counter(metric: Any, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


def closed(transport: StringTransport) -> bool:
    return bool(transport.disconnecting)


def aborted(transport: StringTransport) -> bool:
    return bool(transport.disconnected)  # what StringTransport.abortConnection sets


# Deadlines.


def test_a_head_trickled_a_byte_at_a_time_is_cut_at_the_head_deadline() -> None:
    edge = Edge(head=10.0)
    channel, transport = edge.connect()
    assert channel is not None
    before = counter(metrics.REQUEST_TIMEOUTS, "head")
    for byte in HEAD[:19]:
        channel.dataReceived(bytes([byte]))
        edge.clock.advance(0.5)
    assert not closed(transport)  # 9.5 s, still trickling: the idle timeout alone never ends it
    edge.clock.advance(0.5)
    assert closed(transport)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert counter(metrics.REQUEST_TIMEOUTS, "head") == before + 1
    assert edge.limits.unauthenticated == 0


def test_a_connection_that_never_sends_a_byte_is_closed_at_the_head_deadline_silently() -> None:
    edge = Edge(head=10.0)
    _, transport = edge.connect()
    edge.clock.advance(9.9)
    assert not closed(transport)
    edge.clock.advance(0.1)
    assert closed(transport)
    assert transport.value() == b""


def test_a_client_that_stops_reading_is_aborted_after_the_grace() -> None:
    edge = Edge(head=10.0)
    channel, transport = edge.connect()
    assert channel is not None
    channel.dataReceived(b"GET")
    edge.clock.advance(10.0)
    assert closed(transport) and not aborted(transport)
    edge.clock.advance(CLOSE_GRACE_SECONDS)
    assert aborted(transport)


def test_a_body_trickled_a_byte_at_a_time_is_cut_at_the_body_deadline() -> None:
    edge = Edge(head=10.0, body=30.0)
    channel, transport = edge.connect()
    assert channel is not None
    channel.dataReceived(b"PUT /ok HTTP/1.1\r\nHost: agentd\r\ncontent-length: 100\r\n\r\n")
    before = counter(metrics.REQUEST_TIMEOUTS, "body")
    for _ in range(59):
        channel.dataReceived(b"x")
        edge.clock.advance(0.5)
    assert not closed(transport)  # 29.5 s into the body (past the head deadline), still arriving
    edge.clock.advance(0.5)
    assert closed(transport)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert counter(metrics.REQUEST_TIMEOUTS, "body") == before + 1


def test_each_request_on_a_kept_alive_connection_gets_a_fresh_head_deadline() -> None:
    edge = Edge(head=10.0)
    channel, transport = edge.connect()
    assert channel is not None
    channel.dataReceived(HEAD)
    edge.clock.advance(9.0)
    channel.dataReceived(b"\r\n")
    assert b"200 OK" in transport.value()
    transport.clear()
    edge.clock.advance(40.0)  # idle between requests: within Twisted's 60 s idle timeout
    assert not closed(transport)
    channel.dataReceived(b"GET /ok HTTP/1.1\r\n")
    edge.clock.advance(9.9)
    assert not closed(transport)
    edge.clock.advance(0.1)
    assert closed(transport)
    assert transport.value().startswith(b"HTTP/1.1 408")


def test_pipelined_requests_are_answered_in_turn_without_a_timeout() -> None:
    edge = Edge(head=10.0)
    channel, transport = edge.connect()
    assert channel is not None
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n" + HEAD + b"\r\n")
    edge.clock.advance(60.0)  # the slow answer takes a minute; the next request waits in line
    assert not closed(transport)
    request = edge.slow.requests[0]
    request.write(b"late")
    request.finish()
    assert transport.value().count(b"200 OK") == 2


def test_a_request_being_answered_is_under_no_deadline() -> None:
    edge = Edge(head=10.0, body=30.0)
    channel, transport = edge.connect()
    assert channel is not None
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    edge.clock.advance(50.0)
    assert not closed(transport)


def test_an_authenticated_upgrade_leaves_the_deadlines_and_the_count() -> None:
    edge = Edge(head=10.0, total=1)
    channel, transport = edge.connect()
    assert channel is not None
    channel.dataReceived(b"GET /upgrade HTTP/1.1\r\nHost: a\r\n\r\n")
    assert edge.limits.unauthenticated == 0
    edge.clock.advance(100.0)
    assert not closed(transport)
    other, _ = edge.connect()
    assert other is not None  # the slot it held is free


# Caps.


def test_over_the_cap_the_connection_waiting_longest_makes_room() -> None:
    edge = Edge(total=3)
    _, first_transport = edge.connect("192.0.2.1")
    edge.connect("192.0.2.2")
    edge.connect("192.0.2.3")
    edge.clock.advance(1.0)
    before = counter(metrics.CONNECTIONS_LIMITED, "total", "evicted")
    newest, newest_transport = edge.connect("192.0.2.4")
    assert newest is not None
    assert closed(first_transport) and not closed(newest_transport)
    assert edge.limits.unauthenticated == 3
    assert counter(metrics.CONNECTIONS_LIMITED, "total", "evicted") == before + 1


def test_over_the_cap_connections_that_just_arrived_are_kept_and_the_new_one_refused() -> None:
    edge = Edge(total=3)
    transports = [edge.connect(f"192.0.2.{n}")[1] for n in range(1, 4)]
    edge.clock.advance(0.5)  # a burst accepted in one go: their requests may be on the way
    before = counter(metrics.CONNECTIONS_LIMITED, "total", "refused")
    channel, _ = edge.connect("192.0.2.4")
    assert channel is None
    assert not any(closed(t) for t in transports)
    assert counter(metrics.CONNECTIONS_LIMITED, "total", "refused") == before + 1


def test_connections_whose_requests_are_being_answered_are_never_displaced() -> None:
    edge = Edge(total=2)
    for n in (1, 2):
        channel, _ = edge.connect(f"192.0.2.{n}")
        assert channel is not None
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    edge.clock.advance(5.0)
    assert edge.connect("192.0.2.3")[0] is None


def test_a_kept_alive_connection_waits_again_after_its_answer() -> None:
    edge = Edge(total=2)
    busy, busy_transport = edge.connect("192.0.2.1")
    idle, idle_transport = edge.connect("192.0.2.2")
    assert busy is not None and idle is not None
    busy.dataReceived(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    idle.dataReceived(HEAD + b"\r\n")
    edge.clock.advance(1.0)
    assert edge.connect("192.0.2.3")[0] is not None
    assert closed(idle_transport) and not closed(busy_transport)


def test_the_per_address_cap_makes_room_only_among_that_address() -> None:
    edge = Edge(total=10, per_address=2)
    _, a1 = edge.connect("192.0.2.1")
    _, a2 = edge.connect("192.0.2.1")
    _, b1 = edge.connect("192.0.2.2")
    before = counter(metrics.CONNECTIONS_LIMITED, "per_address", "refused")
    assert edge.connect("192.0.2.1")[0] is None  # a2 and a1 just arrived
    assert counter(metrics.CONNECTIONS_LIMITED, "per_address", "refused") == before + 1
    edge.clock.advance(1.0)
    assert edge.connect("192.0.2.1")[0] is not None
    assert closed(a1) and not closed(a2) and not closed(b1)
    assert edge.connect("192.0.2.3")[0] is not None  # other addresses are not affected


# Behind a trusted proxy.


def test_the_header_is_believed_only_from_a_trusted_proxy() -> None:
    edge = Edge(proxies=("10.0.0.0/8",), header="X-Forwarded-For")
    cases = [
        ("10.0.0.5", b"198.51.100.1, 203.0.113.9", "203.0.113.9"),
        ("10.0.0.5", b"203.0.113.9, 10.0.0.7", "203.0.113.9"),  # a second trusted hop
        ("10.0.0.5", b"[2001:db8::1]:4711", "2001:db8::1"),
        ("10.0.0.5", b"garbage", "10.0.0.5"),
        ("192.0.2.66", b"203.0.113.9", "192.0.2.66"),  # spoofed: the peer is no proxy
    ]
    for peer, forwarded, expected in cases:
        channel, _ = edge.connect(peer)
        assert channel is not None
        channel.dataReceived(HEAD + b"X-Forwarded-For: " + forwarded + b"\r\n\r\n")
        assert edge.ok.clients[-1] == expected, (peer, forwarded)


def test_behind_a_proxy_the_per_address_cap_counts_the_client_the_proxy_names() -> None:
    edge = Edge(per_address=2, proxies=("10.0.0.5",), header="X-Forwarded-For")
    slow = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: %s\r\n\r\n"
    for _ in range(2):
        channel, _ = edge.connect("10.0.0.5")
        assert channel is not None
        channel.dataReceived(slow % b"203.0.113.9")
    channel, transport = edge.connect("10.0.0.5")  # the proxy itself is not capped
    assert channel is not None
    before = counter(metrics.CONNECTIONS_LIMITED, "per_address", "refused")
    channel.dataReceived(slow % b"203.0.113.9")
    assert transport.value().startswith(b"HTTP/1.1 429 ")
    assert b"retry-after: 1" in transport.value().lower()
    assert closed(transport)
    assert counter(metrics.CONNECTIONS_LIMITED, "per_address", "refused") == before + 1
    assert len(edge.slow.requests) == 2
    channel, transport = edge.connect("10.0.0.5")
    assert channel is not None
    channel.dataReceived(slow % b"203.0.113.10")
    assert len(edge.slow.requests) == 3  # another client is served


# Configuration.


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"request_head_timeout_seconds": 0}, "[server] request_head_timeout_seconds"),
        ({"request_body_timeout_seconds": -1}, "[server] request_body_timeout_seconds"),
        ({"max_unauthenticated_connections": 0}, "[server] max_unauthenticated_connections"),
        ({"max_unauthenticated_per_address": 0}, "[server] max_unauthenticated_per_address"),
        (
            {"trusted_proxies": ["10.0.0.0/33"], "client_address_header": "X-Forwarded-For"},
            "[server] trusted_proxies",
        ),
        ({"trusted_proxies": ["10.0.0.1"]}, "[server] client_address_header"),
        ({"client_address_header": "X-Forwarded-For"}, "[server] trusted_proxies"),
        (
            {"trusted_proxies": ["unix"], "client_address_header": "X Forwarded"},
            "[server] client_address_header",
        ),
    ],
)
def test_edge_settings_are_validated_naming_the_key(server: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_module.from_dict({"server": server}, env={})
    assert raised.value.key == expected


def test_edge_defaults() -> None:
    server = config_module.from_dict({}, env={}).server
    assert server.request_head_timeout_seconds == 10.0
    assert server.request_body_timeout_seconds == 30.0
    assert server.max_unauthenticated_connections == 1024
    assert server.max_unauthenticated_per_address == 256
    assert server.trusted_proxies == () and server.client_address_header == ""
