"""Endpoint strings read as Twisted's serverFromString reads them."""

from __future__ import annotations

import pytest

from agentd import cli
from agentd.endpoints import SocketAddress, parse_endpoint, socket_address


def test_parse_endpoint_splits_fields_keywords_and_escapes() -> None:
    assert parse_endpoint("ssl:8443:privateKey=a\\:b=c:interface=\\:\\:1") == (
        "ssl",
        ["8443"],
        {"privateKey": "a:b=c", "interface": "::1"},
    )


@pytest.mark.parametrize(
    ("endpoint", "address"),
    [
        ("tcp:8080", SocketAddress("tcp", "8080", "")),
        ("tcp:8080:10.0.0.1:backlog=9", SocketAddress("tcp", "8080", "10.0.0.1")),
        ("tcp6:8080:50:fe80\\:\\:1", SocketAddress("tcp6", "8080", "fe80::1")),
        ("ssl:8443:k.pem:c.pem:TLSv1_2_METHOD:10.0.0.2", SocketAddress("ssl", "8443", "10.0.0.2")),
        ("unix:/run/agentd.sock", None),
    ],
)
def test_positional_arguments_follow_each_kinds_parser(
    endpoint: str, address: SocketAddress | None
) -> None:
    assert socket_address(endpoint) == address


@pytest.mark.parametrize(
    ("endpoint", "beyond"),
    [
        ("tcp6:8080:50:\\:\\:1", False),
        ("ssl:8443:k.pem:c.pem:TLSv1_2_METHOD:127.0.0.1", False),
        ("ssl:8443:k.pem:c.pem:TLSv1_2_METHOD:0.0.0.0", True),
    ],
)
def test_check_config_reads_a_positional_interface_of_tcp6_and_ssl(
    endpoint: str, beyond: bool
) -> None:
    assert cli.beyond_loopback(endpoint) is beyond
