"""Providers answer prompts: the interface they implement and how they report failures.

A provider module is imported only when its agent is started, so the ``echo`` path never
loads an SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agentd.agent.protocol import ErrorCode, Prompt, Usage, delta_encoder, json_string

if TYPE_CHECKING:
    from agentd.agent.agents import AgentSpec
    from agentd.agent.output import Output


class ProviderError(Exception):
    """A failure the provider reported, already mapped to one of the protocol's codes.

    The text is ours, never the provider's: provider messages can quote request details.
    """

    def __init__(
        self,
        code: ErrorCode,
        text: str,
        retry_after_ms: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.retry_after_ms = retry_after_ms
        # For the log only: HTTP status, the provider's error type, its request id.
        self.detail = detail or {}


class ProviderSetupError(Exception):
    """The agent's provider cannot be built (SDK missing, price table unusable)."""


class Reply:
    """Where a provider streams one answer: delta lines on stdout and the usage so far."""

    def __init__(self, output: Output, query_id: str, usage: Usage) -> None:
        self.output = output
        self.query_id = query_id
        self.usage = usage
        self.extra: dict[str, Any] = {}
        self._prefix, self._suffix = delta_encoder(query_id)

    def delta_line(self, text: str) -> bytes:
        return self._prefix + json_string(text) + self._suffix

    def write(self, lines: bytes) -> None:
        """Write already encoded delta lines; the caller awaits ``drain()`` afterwards."""
        self.output.write(lines)

    async def delta(self, text: str) -> None:
        if text:
            self.output.write(self.delta_line(text))
            await self.output.drain()

    async def drain(self) -> None:
        await self.output.drain()


class Provider(Protocol):
    async def answer(self, prompt: Prompt, reply: Reply) -> None:
        """Stream the answer to ``prompt`` into ``reply``, keeping ``reply.usage`` current so
        that a cancelled or failed query still reports what it consumed."""

    def cost(self, usage: Usage) -> float | None:
        """What ``usage`` costs in USD, or None when the model has no known price."""


def make_provider(spec: AgentSpec, env: Mapping[str, str]) -> Provider:
    """The provider for ``spec``; raises ProviderSetupError when it cannot be built."""
    if spec.provider == "echo":
        from agentd.agent.providers.echo import EchoProvider

        return EchoProvider(env)
    from agentd.agent.prices import PricesUnusable, load_prices

    try:
        prices = load_prices(env)
    except PricesUnusable as e:
        raise ProviderSetupError(f"price table: {e}") from None
    try:
        if spec.provider == "anthropic":
            from agentd.agent.providers.anthropic import AnthropicProvider

            return AnthropicProvider(spec, env, prices)
        from agentd.agent.providers.openai import OpenAIProvider

        return OpenAIProvider(spec, env, prices)
    except ImportError as e:
        raise ProviderSetupError(
            f"the {spec.provider} SDK is not installed (install agentd[agent]): {e.name}"
        ) from None
