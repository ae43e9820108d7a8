"""The echo provider: answers with the prompt's own text, for tests and benchmarks.

It speaks the protocol exactly like a model would (start, deltas, done with usage) and, when
``agentd-agent --test-options`` runs it, honours the prompt's test options: ``repeat``,
``delay_ms``, ``delta_bytes``, ``report_keys`` and ``turn``. A token is a word: the text split after
each run of whitespace, so the deltas concatenate back to the text exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping

from agentd.agent.protocol import Prompt, Usage
from agentd.agent.providers import Reply

# Environment variables whose values ``report_keys`` proves present, by their SHA-256.
KEY_VARIABLES = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")
# Fast streams are written this many bytes at a time, then the loop looks at stdin again.
BATCH_BYTES = 64 * 1024
_WORD = re.compile(r"\s*\S+\s*|\s+")
_FILLER = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def words(text: str) -> list[str]:
    """``text`` cut after each run of whitespace that follows a word; joins back to ``text``."""
    return _WORD.findall(text)


def filler(size: int) -> str:
    return (_FILLER * (size // len(_FILLER) + 1))[:size].decode("ascii")


class EchoProvider:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        # Prompts this process has answered, this one included: ``turn`` reports it, so a
        # test can tell a conversation that went on from one that started again.
        self.turns = 0

    def cost(self, usage: Usage) -> float | None:
        return 0.0

    async def answer(self, prompt: Prompt, reply: Reply) -> None:
        tokens = words(prompt.text)
        pieces = tokens if prompt.delta_bytes is None else [filler(prompt.delta_bytes)]
        reply.usage.input_tokens = len(tokens)
        self.turns += 1
        if prompt.turn:
            reply.extra["turn"] = self.turns
        if prompt.report_keys:
            reply.extra["keys"] = {name: self._digest(name) for name in KEY_VARIABLES}
        if prompt.delay_ms > 0:
            await self._paced(prompt, reply, pieces)
        else:
            await self._batched(prompt, reply, pieces)

    def _digest(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None else hashlib.sha256(value.encode()).hexdigest()

    async def _paced(self, prompt: Prompt, reply: Reply, pieces: list[str]) -> None:
        pause = prompt.delay_ms / 1000
        for turn in range(prompt.repeat):
            for i, piece in enumerate(pieces):
                if turn or i:
                    await asyncio.sleep(pause)
                await reply.delta(piece)
                reply.usage.output_tokens += 1

    async def _batched(self, prompt: Prompt, reply: Reply, pieces: list[str]) -> None:
        # Every pass of a repeated answer is the same bytes: encode one, write many at once.
        one_pass = b"".join(reply.delta_line(piece) for piece in pieces)
        passes_per_batch = max(1, BATCH_BYTES // len(one_pass))
        remaining = prompt.repeat
        while remaining:
            if remaining < prompt.repeat:
                # Let an abort or SIGTERM that arrived meanwhile be acted on.
                await asyncio.sleep(0)
            passes = min(passes_per_batch, remaining)
            reply.write(one_pass * passes)
            reply.usage.output_tokens += passes * len(pieces)
            remaining -= passes
            await reply.drain()
