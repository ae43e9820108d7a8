"""Host keys of VMs, checked as OpenSSH checks them against a ``known_hosts`` file.

A VM's name is ``host`` on port 22 and ``[host]:port`` otherwise, written plain or hashed
(``|1|``); plain names may be OpenSSH patterns (``*``, ``?``, ``!``), and an ``@revoked`` line
refuses its key. Conch's ``KnownHostsFile`` knows no patterns, skips ``@revoked`` lines and
asks whether to add unknown keys; here unknown and changed keys are refused.
"""

from __future__ import annotations

import binascii
import re

from twisted.conch.client.knownhosts import HashedEntry, PlainEntry
from twisted.conch.error import InvalidEntry
from twisted.conch.ssh.keys import BadKeyError, Key


class HostKeyError(Exception):
    def __init__(self, kind: str, host: str) -> None:
        super().__init__(f"{kind} host key for {host}")
        self.kind = kind


class KnownHosts:
    """Reads an OpenSSH known_hosts file on every check, so VMs can be added without a restart."""

    def __init__(self, path: str) -> None:
        self.path = path

    @staticmethod
    def host_name(host: str, port: int) -> bytes:
        return (host if port == 22 else f"[{host}]:{port}").encode()

    def check(self, host: str, port: int, key: Key) -> None:
        name = self.host_name(host, port)
        seen = False
        with open(self.path, "rb") as f:
            for raw in f:
                line = raw.strip()
                if not line or line.startswith(b"#"):
                    continue
                revoked = line.startswith(b"@revoked ")
                if line.startswith(b"@") and not revoked:
                    continue  # @cert-authority: certificates are not used for VMs
                if revoked:
                    line = line.split(None, 1)[1]
                try:
                    entry = (
                        HashedEntry.fromString(line)
                        if line.startswith(HashedEntry.MAGIC)
                        else PlainEntry.fromString(line)
                    )
                except (binascii.Error, InvalidEntry, BadKeyError, ValueError):
                    # a line Conch cannot parse matches nothing, as in OpenSSH
                    continue
                if entry.keyType != entry.publicKey.sshType():
                    continue  # the type field contradicts the key: OpenSSH skips the line
                if isinstance(entry, HashedEntry):
                    if not entry.matchesHost(name):
                        continue
                elif not _host_patterns_match(line.split(None, 1)[0], name):
                    continue
                if revoked:
                    if entry.matchesKey(key):
                        raise HostKeyError("revoked", name.decode())
                    continue
                seen = True
                if entry.matchesKey(key):
                    return
        raise HostKeyError("changed" if seen else "unknown", name.decode())


def _host_patterns_match(patterns: bytes, name: bytes) -> bool:
    """OpenSSH's pattern lists: comma-separated, ``*`` and ``?`` wildcards, ``!`` negates."""
    matched = False
    for pattern in patterns.lower().split(b","):
        negated = pattern.startswith(b"!")
        if negated:
            pattern = pattern[1:]
        regex = re.escape(pattern).replace(rb"\*", b".*").replace(rb"\?", b".")
        if re.fullmatch(regex, name.lower()):
            if negated:
                return False
            matched = True
    return matched
