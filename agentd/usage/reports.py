"""Monthly reports: a user's or a project's month summed from its day keys, with the budget in
force, as JSON or CSV."""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentd.usage.budgets import Budgets, BudgetStatus
from agentd.usage.layout import (
    COUNTER_FIELDS,
    month_days,
    project_day_key,
    project_users_key,
    user_day_key,
    user_project_day_key,
    user_projects_key,
)
from agentd.usage.records import usd, usd_text
from agentd.usage.store import UsageStore


@dataclass(frozen=True)
class Totals:
    """Sums of the day-hash counters; money in micro-dollars."""

    cost: int = 0
    cost_user_key: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    queries: int = 0
    queries_priced: int = 0
    queries_unpriced: int = 0

    @classmethod
    def from_hash(cls, values: Mapping[str, str]) -> Totals:
        return cls(*(int(values.get(name) or 0) for name in COUNTER_FIELDS))

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, n) + getattr(other, n) for n in COUNTER_FIELDS))

    @property
    def operator_cost(self) -> int:
        """What the operator's provider keys paid: the spend budgets count."""
        return self.cost - self.cost_user_key

    def as_dict(self) -> dict[str, Any]:
        return {
            "cost_usd": usd(self.cost),
            "cost_micro_usd": self.cost,
            "user_key_cost_usd": usd(self.cost_user_key),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "queries": self.queries,
            "priced_queries": self.queries_priced,
            "unpriced_queries": self.queries_unpriced,
        }

    def csv_cells(self) -> list[str]:
        return [
            usd_text(self.cost),
            usd_text(self.cost_user_key),
            *(str(getattr(self, n)) for n in COUNTER_FIELDS[2:]),
        ]


CSV_COLUMNS = (
    "cost_usd",
    "user_key_cost_usd",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "queries",
    "priced_queries",
    "unpriced_queries",
)


@dataclass(frozen=True)
class UsageReport:
    """One user's or project's month: totals, the days with usage, the breakdown by project
    (for a user) or by user (for a project), and for the current month the budget in force
    (None: none, or another month; budgets keep no history)."""

    scope: str
    subject: str
    month: str
    totals: Totals
    days: tuple[tuple[datetime.date, Totals], ...]
    breakdown: tuple[tuple[str, Totals], ...]
    budget: BudgetStatus | None = None

    @property
    def breakdown_name(self) -> str:
        return "project" if self.scope == "user" else "user"

    def as_json(self) -> dict[str, Any]:
        name = self.breakdown_name
        return {
            "scope": self.scope,
            self.scope: self.subject,
            "month": self.month,
            "totals": self.totals.as_dict(),
            "days": [{"date": day.isoformat(), **t.as_dict()} for day, t in self.days],
            f"{name}s": [{name: key, **t.as_dict()} for key, t in self.breakdown],
            "budget": None if self.budget is None else self.budget.as_dict(),
        }

    def as_csv(self) -> str:
        """One ``total`` row, one ``day`` row per day with usage, one row per project (or user);
        the budget is in the JSON only."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["row", "date", self.breakdown_name, *CSV_COLUMNS])
        writer.writerow(["total", self.month, "", *self.totals.csv_cells()])
        for day, totals in self.days:
            writer.writerow(["day", day.isoformat(), "", *totals.csv_cells()])
        for key, totals in self.breakdown:
            writer.writerow([self.breakdown_name, "", key, *totals.csv_cells()])
        return out.getvalue()


async def read_report(
    store: UsageStore, scope: str, subject: str, month: str, budgets: Budgets | None = None
) -> UsageReport:
    """Sum the month's day keys, read by name (two pipelined round trips, no KEYS/SCAN); with
    ``budgets``, a third reads the budget in force when ``month`` is the current one."""
    days = month_days(month)
    if scope == "user":
        day_keys = [user_day_key(subject, day) for day in days]
        index = user_projects_key(subject, month)
    else:
        day_keys = [project_day_key(subject, day) for day in days]
        index = project_users_key(subject, month)
    hashes, (members,) = await store.read(day_keys, [index])
    daily = [(day, Totals.from_hash(h)) for day, h in zip(days, hashes, strict=True)]
    names = sorted(members)
    breakdown_keys = [
        user_project_day_key(subject, name, day)
        if scope == "user"
        else user_project_day_key(name, subject, day)
        for name in names
        for day in days
    ]
    split: list[tuple[str, Totals]] = []
    if names:
        per_day, _ = await store.read(breakdown_keys, [])
        for i, name in enumerate(names):
            rows = per_day[i * len(days) : (i + 1) * len(days)]
            split.append((name, sum((Totals.from_hash(h) for h in rows), Totals())))
    totals = sum((t for _, t in daily), Totals())
    budget = None
    if budgets is not None and month == budgets.month():
        budget = await budgets.status(scope, subject, totals.operator_cost)
    return UsageReport(
        scope=scope,
        subject=subject,
        month=month,
        totals=totals,
        days=tuple((day, t) for day, t in daily if t.queries),
        breakdown=tuple((name, t) for name, t in split if t.queries),
        budget=budget,
    )
