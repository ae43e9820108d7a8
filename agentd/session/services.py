"""What a session needs from the rest of agentd: typed seams, gathered once by ``makeService``.

Each seam names what the session asks of a room, not the class that answers it, so nothing
here imports Redis, a cipher or a socket: the rate limiter and the budgets reach a session
as a ``PromptGate``, the usage recorder as a ``UsageSink``, the key store as a ``KeySource``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from agentd.errors import ErrorCode
from agentd.keys.source import KeySource
from agentd.tally import Increments
from agentd.transport import AgentTransport
from agentd.usage.records import UsageEvent


class Client(Protocol):
    """The attached WebSocket, as the session sees it."""

    def send_frame(self, frame: bytes) -> None: ...

    def send_frames(self, frames: list[bytes]) -> None:
        """Like ``send_frame`` for each, in one write."""

    def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True)
class Refusal:
    """Why a prompt may not go ahead, as the client is told: ``code``, ``text`` and the
    ``fields`` its error message carries besides them. ``metric`` counts the refusal once it
    is sent."""

    code: ErrorCode
    text: str
    fields: Mapping[str, Any]
    metric: Increments


class PromptGate(Protocol):
    """Decides, before a prompt reaches the agent, whether it may go ahead."""

    def admit(self, user: str, project: str) -> Deferred[Refusal | None]:
        """None when the prompt may go ahead (and counts against the user's limits)."""
        ...


class UsageSink(Protocol):
    """Where a finished query's usage goes; the session never waits for it."""

    def record(self, event: UsageEvent) -> Deferred[None]: ...

    def waiting_for_agent(self) -> None:
        """A prompt has just gone to its agent: a good moment for work that would otherwise
        stand in a prompt's way."""


class UsageEventFactory(Protocol):
    """Reads the agent's usage object as an event: None when it is malformed."""

    def __call__(
        self,
        usage: Any,
        *,
        query_id: str,
        user: str,
        project: str,
        agent: str,
        timestamp: float,
        key_source: str = ...,
        outcome: str = ...,
    ) -> UsageEvent | None: ...


class SessionServices:
    """What sessions need from the rest of agentd, gathered once by ``makeService``."""

    def __init__(
        self,
        *,
        transport: AgentTransport,
        clock: IReactorTime,
        grace_seconds: float,
        replay_messages: int,
        replay_bytes: int,
        gate: PromptGate | None = None,
        usage: UsageSink | None = None,
        keys: KeySource | None = None,
        usage_event: UsageEventFactory | None = None,
    ) -> None:
        self.transport = transport
        self.clock = clock
        self.grace_seconds = grace_seconds
        self.replay_messages = replay_messages
        self.replay_bytes = replay_bytes
        self.gate = gate
        self.usage = usage
        self.keys = keys
        self.usage_event = usage_event
