"""The anthropic provider: Claude through the official SDK's streaming Messages API.

Usage arrives in the stream: input and cache tokens in ``message_start``, the output count
(cumulative, authoritative) in ``message_delta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import anthropic
from anthropic.types import (
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextDelta,
)

from agentd.agent.agents import AgentSpec
from agentd.agent.prices import price
from agentd.agent.protocol import ErrorCode, Prompt, Usage, estimate_tokens
from agentd.agent.providers import ProviderError, Reply
from agentd.agent.providers.http import connection_error, status_error, transport_errors
from agentd.pricing import PriceTable


class AnthropicProvider:
    def __init__(self, spec: AgentSpec, env: Mapping[str, str], prices: PriceTable | None) -> None:
        self.spec = spec
        self.prices = prices
        self.messages: list[dict[str, str]] = []
        self.client: anthropic.AsyncAnthropic | None = None
        key = env.get("ANTHROPIC_API_KEY")
        if key:
            options: dict[str, Any] = {"api_key": key, "base_url": env.get("ANTHROPIC_BASE_URL")}
            if spec.max_retries is not None:
                options["max_retries"] = spec.max_retries
            self.client = anthropic.AsyncAnthropic(**options)
            # Load the Messages resource now rather than inside the first query's time limit.
            self.client.messages  # noqa: B018

    def cost(self, usage: Usage) -> float | None:
        return price(self.prices, usage)

    async def answer(self, prompt: Prompt, reply: Reply) -> None:
        if self.client is None:
            raise ProviderError(ErrorCode.PROVIDER_AUTH, "ANTHROPIC_API_KEY is not set on the VM")
        messages = [*self.messages, {"role": "user", "content": prompt.text}]
        system: Any = self.spec.system or anthropic.NOT_GIVEN
        usage = reply.usage
        parts: list[str] = []
        started = finished = output_counted = False
        try:
            stream = await self.client.messages.create(
                model=self.spec.model,
                max_tokens=self.spec.max_tokens,
                messages=cast(Any, messages),
                system=system,
                stream=True,
            )
            async with stream:
                async for event in stream:
                    started = True
                    if isinstance(event, RawContentBlockDeltaEvent):
                        if isinstance(event.delta, TextDelta):
                            parts.append(event.delta.text)
                            await reply.delta(event.delta.text)
                    elif isinstance(event, RawMessageStartEvent):
                        _count(usage, event.message.usage)
                    elif isinstance(event, RawMessageDeltaEvent):
                        _count(usage, event.usage)
                        output_counted = True
                    elif isinstance(event, RawMessageStopEvent):
                        finished = True
        except anthropic.APIStatusError as e:
            raise status_error(e.status_code, e.type, e.response.headers, e.request_id) from None
        except anthropic.APIConnectionError as e:
            raise connection_error(e, started) from None
        except transport_errors() as e:
            raise connection_error(e, started) from None
        finally:
            answer = "".join(parts)
            if started and not output_counted:
                usage.output_tokens = max(usage.output_tokens, estimate_tokens(answer))
                usage.estimated = True
            if answer:
                # The conversation keeps what the user saw, even of an interrupted answer.
                self.messages = [*messages, {"role": "assistant", "content": answer}]
        if not finished:
            raise ProviderError(
                ErrorCode.PROVIDER_UNAVAILABLE, "the provider's stream ended before the answer"
            )


def _count(usage: Usage, reported: Any) -> None:
    """Take the counts a ``message_start`` or ``message_delta`` reports (None: not reported)."""
    if reported.input_tokens is not None:
        usage.input_tokens = reported.input_tokens
    if reported.output_tokens is not None:
        usage.output_tokens = reported.output_tokens
    if reported.cache_read_input_tokens is not None:
        usage.cache_read_tokens = reported.cache_read_input_tokens
    if reported.cache_creation_input_tokens is not None:
        usage.cache_write_tokens = reported.cache_creation_input_tokens
