"""Monthly budgets: may a prompt go ahead, given what the operator's keys paid this month.

A user's budget is ``[usage] monthly_budget_usd`` unless an operator overrides it in the
budgets hash; a project has one only when overridden. Only operator-paid cost counts. At
``soft_budget_ratio`` of a budget a warning is logged, once per user or project and month
across agentd instances and restarts. When the store cannot say, and while Redis is known to
fail, prompts are allowed.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd import metrics
from agentd.config import PROJECT_RE, USER_RE
from agentd.redishealth import RedisHealth
from agentd.usage.layout import (
    DAY_SECONDS,
    SCOPES,
    budget_field,
    month_days,
    month_of,
    soft_warning_key,
)
from agentd.usage.records import MICRO_USD, usd, usd_text
from agentd.usage.store import MonthSpend, UsageStore

_log = Logger()


@dataclass(slots=True)  # made for every prompt: not frozen, which is dearer
class BudgetDecision:
    """May a prompt go ahead. When refused: which budget (``scope``), its amount and the
    month-to-date spend that reached it; when allowed: the user's budget (None: none) and
    spend."""

    allowed: bool
    scope: str | None
    budget_usd: float | None
    spent_usd: float


_UNKNOWN = BudgetDecision(True, None, None, 0.0)


@dataclass(frozen=True)
class BudgetStatus:
    """A monthly budget and the operator-paid spend that counts against it, in micro-dollars,
    as reports show it."""

    budget: int
    spent: int
    soft_ratio: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "monthly_usd": usd(self.budget),
            "spent_usd": usd(self.spent),
            "soft_ratio": self.soft_ratio,
            "soft_warning": self.spent >= self.budget * self.soft_ratio,
            "reached": self.spent >= self.budget,
        }


class Budgets:
    """Checks and overrides of the monthly budgets, over a usage store."""

    def __init__(
        self,
        store: UsageStore,
        health: RedisHealth | None,
        *,
        monthly_budget_usd: float,
        soft_budget_ratio: float,
        now: Callable[[], float],
    ) -> None:
        self._store = store
        self._health = health
        self._default_budget = _budget_micro(monthly_budget_usd)
        self._soft_ratio = soft_budget_ratio
        self._now = now
        self._warned_month = ""
        self._warned: set[tuple[str, str]] = set()

    def check(self, user: str, project: str) -> Deferred[BudgetDecision]:
        """Refuse when this month's operator-paid spend has reached the user's or the project's
        budget; allow when the store cannot say."""
        return Deferred.fromCoroutine(self._check(user, project))

    async def _check(self, user: str, project: str) -> BudgetDecision:
        if self._health is not None and not self._health.up:
            # Known to fail: no prompt waits for its timeout; the health probes it.
            return _UNKNOWN
        month = self.month()
        try:
            spend = await maybeDeferred(self._store.spend, user, project, month_days(month))
        except Exception:
            if self._health is not None:
                self._health.failed(Failure())
            return _UNKNOWN
        return self.decide(spend, user, project, month)

    def month(self) -> str:
        """The month whose spend counts now, as ``YYYY-MM``."""
        return month_of(self._now())

    def decide(self, spend: MonthSpend, user: str, project: str, month: str) -> BudgetDecision:
        """The decision on ``month``'s spend as read from the store (warning once at the soft
        ratio); allow when it cannot be made."""
        try:
            return self._decide(spend, user, project, month)
        except Exception:
            _log.failure("budget check failed; allowing the prompt")
            return _UNKNOWN

    def _decide(self, spend: MonthSpend, user: str, project: str, month: str) -> BudgetDecision:
        scopes = (
            ("user", user, spend.user, self._budget(spend.user_budget, self._default_budget)),
            ("project", project, spend.project, self._budget(spend.project_budget, 0)),
        )
        for scope, subject, spent, budget in scopes:
            if budget and spent >= budget * self._soft_ratio:
                self._soft_warning(scope, subject, month, spent, budget)
        for scope, _, spent, budget in scopes:
            if budget and spent >= budget:
                return BudgetDecision(False, scope, usd(budget), usd(spent))
        budget = scopes[0][3]
        return BudgetDecision(True, None, usd(budget) if budget else None, usd(spend.user))

    def _budget(self, override: str | None, default: int) -> int:
        if override is None:
            return default
        try:
            return _budget_micro(float(override))
        except ValueError:
            _log.warn("ignoring budget override {value!r}: not a USD amount", value=override)
            return default

    def _soft_warning(self, scope: str, subject: str, month: str, spent: int, budget: int) -> None:
        if month != self._warned_month:
            self._warned_month, self._warned = month, set()
        marker = (scope, subject)
        if marker in self._warned:
            return
        self._warned.add(marker)
        Deferred.fromCoroutine(self._warn_once(scope, subject, month, spent, budget))

    async def _warn_once(
        self, scope: str, subject: str, month: str, spent: int, budget: int
    ) -> None:
        # Once per month across restarts and agentd instances: the first to claim logs it.
        month_end = calendar.timegm(month_days(month)[-1].timetuple()) + DAY_SECONDS
        ttl = max(1, int(month_end - self._now()) + DAY_SECONDS)
        try:
            first = await maybeDeferred(
                self._store.claim, soft_warning_key(scope, subject, month), ttl
            )
        except Exception:
            self._warned.discard((scope, subject))  # the next check tries again
            return
        if first:
            metrics.BUDGET_SOFT_WARNINGS.labels(scope).inc()
            _log.warn(
                "{scope} {subject} has spent {spent} USD of its {budget} USD budget for {month}",
                scope=scope,
                subject=subject,
                spent=usd_text(spent),
                budget=usd_text(budget),
                month=month,
            )

    def status(self, scope: str, subject: str, spent: int) -> Deferred[BudgetStatus | None]:
        """The budget in force now for one user or project, with ``spent`` (operator-paid
        micro-dollars) against it; None when there is none."""
        return Deferred.fromCoroutine(self._status(scope, subject, spent))

    async def _status(self, scope: str, subject: str, spent: int) -> BudgetStatus | None:
        override = await self._store.budget(budget_field(scope, subject))
        budget = self._budget(override, self._default_budget if scope == "user" else 0)
        return BudgetStatus(budget, spent, self._soft_ratio) if budget else None

    def set(self, scope: str, subject: str, usd: float | None) -> Deferred[None]:
        """Override the monthly budget of one user or project (0: none; None: the default)."""
        if scope not in SCOPES:
            raise ValueError("scope must be user or project")
        if not (USER_RE if scope == "user" else PROJECT_RE).fullmatch(subject):
            raise ValueError(f"invalid {scope} id")
        value = None if usd is None else repr(_budget_micro(usd) / MICRO_USD)
        return self._store.set_budget(budget_field(scope, subject), value)


def _budget_micro(usd: float) -> int:
    if not math.isfinite(usd) or usd < 0:
        raise ValueError("a budget is a non-negative number of USD")
    return round(usd * MICRO_USD)
