"""Twisted server endpoint strings read as ``serverFromString`` reads them: which kind of
socket, and the port and interface of those that have them.

Twisted's own splitter (``twisted.internet.endpoints._parse``) is private; this one follows
its rules: ``:`` separates fields, a field's first ``=`` makes it a keyword argument, and a
backslash takes the next character literally (``tcp6:8080:interface=\\:\\:1``).
"""

from __future__ import annotations

from dataclasses import dataclass

# The positional arguments of Twisted's server endpoint parsers, in order, up to the
# interface; "tcp4" is not a server endpoint kind.
_POSITIONAL = {
    "tcp": ("port", "interface"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface"),
}


@dataclass(frozen=True)
class SocketAddress:
    """Where a tcp, tcp6 or ssl endpoint listens; ``interface`` "" is Twisted's default,
    every address."""

    kind: str
    port: str
    interface: str


def parse_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """The kind, positional arguments and keyword arguments of an endpoint string."""
    fields: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    fields.append((key, "".join(current)))
    (_, kind), rest = fields[0], fields[1:]
    args = [value for name, value in rest if name is None]
    kwargs = {name: value for name, value in rest if name is not None}
    return kind, args, kwargs


def socket_address(description: str) -> SocketAddress | None:
    """The port and interface of a tcp, tcp6 or ssl endpoint; None for other kinds."""
    kind, args, kwargs = parse_endpoint(description)
    names = _POSITIONAL.get(kind)
    if names is None:
        return None
    values = dict(zip(names, args, strict=False)) | kwargs
    return SocketAddress(kind, values.get("port", ""), values.get("interface", ""))
