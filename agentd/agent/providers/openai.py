"""The openai provider: chat completions through the official SDK, streamed with usage.

The usage arrives in one final chunk, sent because the request sets
``stream_options={"include_usage": True}``. OpenAI counts cached prompt tokens inside
``prompt_tokens``; they are moved to ``cacheReadTokens`` so that each token is priced once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import openai

from agentd.agent.agents import AgentSpec
from agentd.agent.prices import price
from agentd.agent.protocol import ErrorCode, Prompt, Usage, estimate_tokens
from agentd.agent.providers import ProviderError, Reply
from agentd.agent.providers.http import connection_error, status_error, transport_errors
from agentd.pricing import PriceTable


class OpenAIProvider:
    def __init__(self, spec: AgentSpec, env: Mapping[str, str], prices: PriceTable | None) -> None:
        self.spec = spec
        self.prices = prices
        self.messages: list[dict[str, str]] = []
        if spec.system:
            self.messages.append({"role": "system", "content": spec.system})
        self.client: openai.AsyncOpenAI | None = None
        key = env.get("OPENAI_API_KEY")
        if key:
            options: dict[str, Any] = {"api_key": key, "base_url": env.get("OPENAI_BASE_URL")}
            if spec.max_retries is not None:
                options["max_retries"] = spec.max_retries
            self.client = openai.AsyncOpenAI(**options)
            # Load the chat resource now rather than inside the first query's time limit.
            self.client.chat.completions  # noqa: B018

    def cost(self, usage: Usage) -> float | None:
        return price(self.prices, usage)

    async def answer(self, prompt: Prompt, reply: Reply) -> None:
        if self.client is None:
            raise ProviderError(ErrorCode.PROVIDER_AUTH, "OPENAI_API_KEY is not set on the VM")
        messages = [*self.messages, {"role": "user", "content": prompt.text}]
        usage = reply.usage
        parts: list[str] = []
        started = finished = counted = False
        try:
            stream = await self.client.chat.completions.create(
                model=self.spec.model,
                messages=cast(Any, messages),
                max_completion_tokens=self.spec.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    started = True
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            await reply.delta(choice.delta.content)
                        if choice.finish_reason is not None:
                            finished = True
                    if chunk.usage is not None:
                        details = chunk.usage.prompt_tokens_details
                        cached = (details.cached_tokens if details else None) or 0
                        usage.input_tokens = max(0, chunk.usage.prompt_tokens - cached)
                        usage.cache_read_tokens = cached
                        usage.output_tokens = chunk.usage.completion_tokens
                        counted = True
        except openai.APIStatusError as e:
            raise status_error(e.status_code, e.type, e.response.headers, e.request_id) from None
        except openai.APIConnectionError as e:
            raise connection_error(e, started) from None
        except openai.APIError as e:
            # An error event inside a stream that began with HTTP 200.
            raise status_error(200, e.type, {}) from None
        except transport_errors() as e:
            raise connection_error(e, started) from None
        finally:
            answer = "".join(parts)
            if started and not counted:
                usage.input_tokens = estimate_tokens("".join(m["content"] for m in messages))
                usage.output_tokens = estimate_tokens(answer)
                usage.estimated = True
            if answer:
                # The conversation keeps what the user saw, even of an interrupted answer.
                self.messages = [*messages, {"role": "assistant", "content": answer}]
        if not finished:
            raise ProviderError(
                ErrorCode.PROVIDER_UNAVAILABLE, "the provider's stream ended before the answer"
            )
