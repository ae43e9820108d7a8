"""Client addresses: parsing what headers and transports give, and trusting only proxies."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.http_headers import Headers

from agentd.clientaddr import ClientAddresses, address_key, parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.9", "203.0.113.9"),
        (" 203.0.113.9:4711 ", "203.0.113.9"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("unknown", None),
        ("_hidden", None),
        ("", None),
    ],
)
def test_addresses_are_parsed_as_proxies_write_them(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == expected


def test_ipv6_clients_are_counted_by_their_64_prefix() -> None:
    one, other = ipaddress.ip_address("2001:db8:1:2::1"), ipaddress.ip_address("2001:db8:1:2::ff")
    assert address_key(one) == address_key(other) == "2001:db8:1:2::/64"
    assert address_key(ipaddress.ip_address("203.0.113.9")) == "203.0.113.9"


def forwarded(value: str) -> Headers:
    return Headers({b"X-Forwarded-For": [value.encode()]})


def test_without_proxies_the_header_is_ignored() -> None:
    addresses = ClientAddresses()
    peer = IPv4Address("TCP", "192.0.2.66", 1234)
    assert str(addresses.resolve(peer, forwarded("203.0.113.9"))) == "192.0.2.66"
    assert not addresses.is_proxy(peer)


def test_trusted_proxies_are_addresses_and_networks() -> None:
    addresses = ClientAddresses(["10.0.0.0/8", "2001:db8:ffff::/48"], "X-Forwarded-For")
    assert addresses.is_proxy(IPv4Address("TCP", "10.1.2.3", 1))
    assert addresses.is_proxy(IPv6Address("TCP", "2001:db8:ffff::5", 1))
    assert addresses.is_proxy(IPv6Address("TCP", "::ffff:10.1.2.3", 1))
    assert not addresses.is_proxy(IPv4Address("TCP", "192.0.2.66", 1))


def test_peers_are_counted_by_address_and_ipv6_peers_by_their_64() -> None:
    addresses = ClientAddresses()
    assert addresses.peer_key(IPv4Address("TCP", "192.0.2.66", 1)) == "192.0.2.66"
    assert addresses.peer_key(IPv6Address("TCP", "2001:db8:1:2::7", 1)) == "2001:db8:1:2::/64"
    assert addresses.peer_key(IPv6Address("TCP", "::ffff:192.0.2.66", 1)) == "192.0.2.66"
    assert addresses.peer_key(UNIXAddress(b"/run/agentd.sock")) is None


def test_the_client_is_the_rightmost_address_that_is_not_a_trusted_proxy() -> None:
    addresses = ClientAddresses(["10.0.0.0/8"], "X-Forwarded-For")
    proxy = IPv4Address("TCP", "10.0.0.5", 1234)
    assert str(addresses.resolve(proxy, forwarded("1.1.1.1, 203.0.113.9, 10.0.0.7"))) == (
        "203.0.113.9"
    )
    headers = Headers({b"X-Forwarded-For": [b"1.1.1.1", b"203.0.113.9"]})  # two header lines
    assert str(addresses.resolve(proxy, headers)) == "203.0.113.9"
    assert str(addresses.resolve(proxy, Headers())) == "10.0.0.5"  # the proxy's own request


def test_unix_socket_peers_are_trusted_only_when_listed() -> None:
    peer = UNIXAddress(b"/run/agentd.sock")
    assert ClientAddresses().resolve(peer, forwarded("203.0.113.9")) is None
    listed = ClientAddresses(["unix"], "X-Forwarded-For")
    assert str(listed.resolve(peer, forwarded("203.0.113.9"))) == "203.0.113.9"
    assert listed.is_proxy(peer) and not ClientAddresses().is_proxy(peer)
