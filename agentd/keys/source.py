"""What a session gets from the keys room: the key variables for one user's agent process.

``KeySource`` is the seam a session depends on; ``agentd.keys.store.KeyStore`` provides it.
Nothing here reaches Redis or a cipher, so naming the seam imports neither.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

PROVIDER_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


class SecretEnv(Mapping[str, str]):
    """Environment variables whose values are secrets: its repr names variables, never values."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"SecretEnv({sorted(self._values)})"


@dataclass(frozen=True)
class AgentKeys:
    """What one agent process gets: its key variables and who pays for its queries.

    ``source`` is ``"user"`` if any of the user's own keys is in ``env``, ``"operator"`` if
    only operator keys are, ``"none"`` if there is no key at all. ``payer(provider)`` answers
    per provider, for a user who stored a key for one provider but not the other.
    """

    env: Mapping[str, str]
    source: str
    user_providers: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", SecretEnv(self.env))

    def payer(self, provider: str) -> str:
        if provider in self.user_providers:
            return "user"
        return "operator" if PROVIDER_ENV.get(provider, "") in self.env else "none"


class KeySource(Protocol):
    """Where a session gets the provider keys for a user's agent process."""

    def keys_for(self, user: str) -> Awaitable[AgentKeys]:
        """The user's own key for each provider where they stored one, the operator's otherwise.

        Fails rather than fall back to an operator key when a user key may exist but cannot be
        read.
        """
