"""What reaching VMs over SSH needs: the user, key, host keys, attach command and limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.conch.ssh.keys import Key

from agentd.transport import AttachCommand
from agentd.transport.ssh.known_hosts import KnownHosts


@dataclass(frozen=True)
class SSHSettings:
    user: str
    private_key: Key = field(repr=False)
    known_hosts: KnownHosts
    attach: AttachCommand = field(default_factory=AttachCommand)
    forward_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    connect_timeout: float = 10.0
    connect_attempts: int = 3
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    max_channels: int = 10
    max_line: int = 1_048_576


def load_private_key(path: str) -> Key:
    key: Key = Key.fromFile(path)
    return key
