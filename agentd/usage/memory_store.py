"""The usage keys in this process, under the same rules as in Redis, for agentd without it."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, succeed

from agentd.usage.layout import (
    BUDGETS_KEY,
    budget_field,
    month_name,
    month_total_expiry,
    project_day_key,
    project_month_total_key,
    user_day_key,
    user_month_total_key,
)
from agentd.usage.records import UsageRecord
from agentd.usage.reports import Totals
from agentd.usage.store import MonthSpend


class MemoryUsageStore:
    """The same keys and rules in this process, for agentd without Redis."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._values: dict[str, bytes] = {}
        self._hashes: dict[str, dict[str, str]] = {}
        self._sets: dict[str, set[str]] = {}
        self._expiry: dict[str, float] = {}
        self._next_sweep = 0.0

    def _live(self, key: str) -> bool:
        expiry = self._expiry.get(key)
        if expiry is not None and expiry <= self._now():
            self._values.pop(key, None)
            self._hashes.pop(key, None)
            self._sets.pop(key, None)
            del self._expiry[key]
        return key in self._values or key in self._hashes or key in self._sets

    def _sweep(self) -> None:
        """Forget expired keys nobody reads any more (at most hourly)."""
        now = self._now()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 3600
        for key in [k for k, expiry in self._expiry.items() if expiry <= now]:
            self._live(key)

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        self._sweep()
        marker, *day_keys, projects, users, user_total, project_total = record.keys()
        if self._live(marker):
            return succeed("duplicate")
        if expire_at <= self._now():
            return succeed("expired")
        counters = record.counters()
        increments = [(name, increment) for name, increment in counters.items() if increment]
        for key in day_keys:
            values = self._hashes[key] if self._live(key) else self._hashes.setdefault(key, {})
            for name, increment in increments:  # as in Redis, a zero adds no field
                values[name] = str(int(values.get(name, "0")) + increment)
            self._expiry[key] = expire_at
        for key, member in ((projects, record.project), (users, record.user)):
            members = self._sets[key] if self._live(key) else self._sets.setdefault(key, set())
            members.add(member)
            self._expiry[key] = month_expire_at
        for key in (user_total, project_total):
            # As in Redis: a missing total waits for the budget check to rebuild it.
            if self._live(key):
                operator = counters["cost"] - counters["cost_user_key"]
                self._values[key] = str(int(self._values[key]) + operator).encode()
        self._values[marker] = record.to_line()
        self._expiry[marker] = expire_at
        return succeed("recorded")

    def apply_all(
        self, items: Sequence[tuple[UsageRecord, int, int]], timeout: float | None = None
    ) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._apply_all(items, timeout))

    async def _apply_all(
        self, items: Sequence[tuple[UsageRecord, int, int]], timeout: float | None
    ) -> list[str]:
        # One by one through apply, stopping at the first failure, as Redis would fail the
        # whole call.
        return [await self.apply(*item, timeout) for item in items]

    def _hash(self, key: str) -> dict[str, str]:
        return dict(self._hashes.get(key, {})) if self._live(key) else {}

    def confirm(self, records: Sequence[UsageRecord]) -> Deferred[list[bool]]:
        return succeed([True] * len(records))  # this process is the only copy there is

    def spend(self, user: str, project: str, days: Sequence[datetime.date]) -> Deferred[MonthSpend]:
        month = month_name(days[0])

        def spent(key: str, day_keys: Iterable[str]) -> int:
            if not self._live(key):
                total = sum(Totals.from_hash(self._hash(k)).operator_cost for k in day_keys)
                self._values[key] = str(total).encode()
                self._expiry[key] = month_total_expiry(month)
            return int(self._values[key])

        budgets = self._hashes.get(BUDGETS_KEY, {})
        return succeed(
            MonthSpend(
                user=spent(
                    user_month_total_key(user, month), (user_day_key(user, day) for day in days)
                ),
                project=spent(
                    project_month_total_key(project, month),
                    (project_day_key(project, day) for day in days),
                ),
                user_budget=budgets.get(budget_field("user", user)),
                project_budget=budgets.get(budget_field("project", project)),
            )
        )

    def read(
        self, hash_keys: Sequence[str], set_keys: Sequence[str]
    ) -> Deferred[tuple[list[dict[str, str]], list[set[str]]]]:
        sets = [set(self._sets.get(k, ())) if self._live(k) else set() for k in set_keys]
        return succeed(([self._hash(key) for key in hash_keys], sets))

    def budget(self, field: str) -> Deferred[str | None]:
        return succeed(self._hashes.get(BUDGETS_KEY, {}).get(field))

    def set_budget(self, field: str, value: str | None) -> Deferred[None]:
        budgets = self._hashes.setdefault(BUDGETS_KEY, {})
        if value is None:
            budgets.pop(field, None)
        else:
            budgets[field] = value
        return succeed(None)

    def claim(self, key: str, ttl: int) -> Deferred[bool]:
        if self._live(key):
            return succeed(False)
        self._values[key] = b"1"
        self._expiry[key] = self._now() + ttl
        return succeed(True)

    def probe(self) -> Deferred[None]:
        return succeed(None)
