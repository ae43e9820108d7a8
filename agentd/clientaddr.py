"""Which address a client connects from: the TCP peer, or what a trusted proxy reports.

A forwarding header (``[server] client_address_header``, such as X-Forwarded-For) is believed
only when the TCP peer is one of ``[server] trusted_proxies``. Each proxy appends the address
it was reached from, so the client is the rightmost address in the header that is not itself
a trusted proxy; everything left of it is the client's own claim and is never read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.web.http_headers import Headers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# An IPv6 host normally holds a whole /64, so per-address counts take IPv6 clients by it.
IPV6_PREFIX = 64


def parse_address(text: str) -> IPAddress | None:
    """An address as a header or a transport gives it ("1.2.3.4:80", "[::1]:80" included)."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        text = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_key(address: IPAddress) -> str:
    """The name a per-address count is kept under."""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


def _peer_ip(peer: IAddress | None) -> IPAddress | None:
    if isinstance(peer, IPv4Address | IPv6Address):
        return parse_address(peer.host)
    return None


class ClientAddresses:
    """Resolves the client behind a connection or request from the configured proxies."""

    def __init__(self, trusted_proxies: Sequence[str] = (), header: str = "") -> None:
        self._networks = [
            ipaddress.ip_network(entry, strict=False)
            for entry in trusted_proxies
            if entry != "unix"
        ]
        self._unix = "unix" in trusted_proxies
        self._header = header.encode("ascii")

    def _trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)

    def is_proxy(self, peer: IAddress | None) -> bool:
        """Whether ``peer`` is a trusted proxy, whose requests name their client."""
        if not self._header:
            return False
        if isinstance(peer, UNIXAddress):
            return self._unix
        address = _peer_ip(peer)
        return address is not None and self._trusted(address)

    def peer_key(self, peer: IAddress | None) -> str | None:
        """What a connection from ``peer`` counts under for the per-address cap; None when it
        has no IP address (a UNIX socket)."""
        if isinstance(peer, IPv4Address):
            return peer.host  # already the dotted quad accept() gave
        address = _peer_ip(peer)
        return None if address is None else address_key(address)

    def resolve(self, peer: IAddress, headers: Headers) -> IPAddress | None:
        """The client's address for one request; None for an untrusted UNIX-socket peer."""
        client = _peer_ip(peer)
        if not self.is_proxy(peer):
            return client
        hops = [
            hop
            for value in headers.getRawHeaders(self._header, [])
            for hop in value.decode("latin-1").split(",")
        ]
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                break
            client = address
            if not self._trusted(address):
                break
        return client
