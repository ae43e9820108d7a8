"""What the recorder, budgets and reports need from a usage store: one interface, two stores.

``RedisUsageStore`` (agentd.usage.redis_store) keeps the keys in Redis for every agentd
instance; ``MemoryUsageStore`` (agentd.usage.memory_store) keeps the same keys under the same
rules in this process, for agentd without Redis.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from agentd.usage.records import UsageRecord


@dataclass(slots=True)  # made for every prompt: not frozen, which is dearer
class MonthSpend:
    """Operator-paid micro-dollars this month, and the runtime budget overrides as stored."""

    user: int
    project: int
    user_budget: str | None
    project_budget: str | None


class UsageStore(Protocol):
    """Where records are applied and month data read; Redis and in-memory behave alike."""

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        """Apply once: ``recorded``, ``duplicate`` or ``expired`` (older than retention).
        ``timeout`` overrides the store's own."""
        ...

    def apply_all(
        self, items: Sequence[tuple[UsageRecord, int, int]], timeout: float | None = None
    ) -> Deferred[list[str]]:
        """``apply`` each ``(record, expire_at, month_expire_at)`` in order, in one step where
        the store can: each record's result; fails as a whole (some may be applied, and are
        duplicates when applied again)."""
        ...

    def confirm(self, records: Sequence[UsageRecord]) -> Deferred[list[bool]]:
        """Whether each applied record would survive a failover (is on a replica, or there
        is none to wait for); False leaves it for a replay. Never fails."""
        ...

    def spend(
        self, user: str, project: str, days: Sequence[datetime.date]
    ) -> Deferred[MonthSpend]: ...

    def read(
        self, hash_keys: Sequence[str], set_keys: Sequence[str]
    ) -> Deferred[tuple[list[dict[str, str]], list[set[str]]]]: ...

    def budget(self, field: str) -> Deferred[str | None]:
        """One runtime budget override as stored (``user:{id}`` or ``project:{id}``)."""
        ...

    def set_budget(self, field: str, value: str | None) -> Deferred[None]: ...

    def claim(self, key: str, ttl: int) -> Deferred[bool]:
        """True for the first caller until ``key`` expires after ``ttl`` seconds."""
        ...

    def probe(self) -> Deferred[Any]:
        """Fires once the store takes writes; fails while it does not."""
        ...
