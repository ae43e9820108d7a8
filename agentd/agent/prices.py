"""The VM's price table, read once when an agent that calls a provider starts.

``AGENTD_PRICES`` names the file; otherwise ``/etc/agentd/prices.toml`` is used when present
(the VM image installs agentd's ``etc/prices.toml`` there). Without a table, a done message
reports ``"cost": null`` and agentd prices the usage from its own table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from agentd.agent.protocol import Usage
from agentd.pricing import PriceTable, PriceTableError

DEFAULT_PATH = "/etc/agentd/prices.toml"


class PricesUnusable(ValueError):
    """The price table named by the environment cannot be read; the message names the file."""


def load_prices(env: Mapping[str, str]) -> PriceTable | None:
    path = env.get("AGENTD_PRICES") or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else "")
    if not path:
        return None
    try:
        return PriceTable.load(path)
    except PriceTableError as e:
        raise PricesUnusable(str(e)) from None


def price(prices: PriceTable | None, usage: Usage) -> float | None:
    """What ``usage`` costs in USD by ``prices``; None without a table or a price for the model."""
    if prices is None:
        return None
    return prices.cost(
        usage.model,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
    )
