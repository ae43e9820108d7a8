"""Token prices per model, from a TOML price table, and the cost of a query.

The table (``etc/prices.toml``) has one table per model::

    [models."claude-sonnet-4-5"]
    effective = 2025-09-29      # prices apply from this date (UTC)
    input = 3.00                # USD per million input tokens
    output = 15.00              # USD per million output tokens
    cache_read = 0.30           # USD per million tokens read from the prompt cache
    cache_write = 3.75          # USD per million tokens written to the prompt cache

A model may appear several times as ``[[models."name"]]`` entries with different effective
dates; the latest entry not after the query's date applies. Cache tokens are priced once, at
their own rate (0 when absent): providers report them separately from ``input``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd.tomltables import TomlError, load_file, read_table, rule


class PriceTableError(TomlError):
    """The price table is malformed; the message names the model and the key."""


_EPOCH = datetime.date(1970, 1, 1)
_NON_NEGATIVE = rule(lambda price: price >= 0, "must be a non-negative number")


@dataclass(frozen=True, kw_only=True)
class ModelPrice:
    effective: datetime.date = _EPOCH
    input: float = field(metadata=_NON_NEGATIVE)
    output: float = field(metadata=_NON_NEGATIVE)
    cache_read: float = field(default=0.0, metadata=_NON_NEGATIVE)
    cache_write: float = field(default=0.0, metadata=_NON_NEGATIVE)

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> float:
        total = (
            input_tokens * self.input
            + output_tokens * self.output
            + cache_read_tokens * self.cache_read
            + cache_write_tokens * self.cache_write
        )
        return total / 1_000_000


@dataclass(frozen=True)
class PriceTable:
    models: dict[str, tuple[ModelPrice, ...]]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriceTable:
        raw_models = data.get("models", {})
        if not isinstance(raw_models, dict):
            raise PriceTableError("models", "must be a table of model names")
        models: dict[str, tuple[ModelPrice, ...]] = {}
        for name, raw in raw_models.items():
            entries = raw if isinstance(raw, list) else [raw]
            prices = [read_table(ModelPrice, e, f"models.{name}", PriceTableError) for e in entries]
            models[name] = tuple(sorted(prices, key=lambda p: p.effective))
        return cls(models=models)

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        return cls.from_dict(load_file(str(path), PriceTableError))

    @classmethod
    def empty(cls) -> PriceTable:
        return cls(models={})

    def price(self, model: str, on: datetime.date | None = None) -> ModelPrice | None:
        """The price in force for ``model`` on ``on`` (default: today, UTC), or None."""
        day = on or datetime.datetime.now(datetime.UTC).date()
        current = None
        for entry in self.models.get(model, ()):
            if entry.effective <= day:
                current = entry
        return current

    def cost(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        on: datetime.date | None = None,
    ) -> float | None:
        """The query's cost in USD, or None when the model has no price."""
        entry = self.price(model, on)
        if entry is None:
            return None
        return entry.cost(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
