"""The prompt gate agentd wires: the user's prompt rate limit first, then the monthly budgets.

A prompt the rate limit refuses never reaches the budgets, and one it accepts is counted
against the user's limit even when a budget then refuses it, as each check records its own
decision. Both are reached through the seams below, so this module imports neither Redis nor
the usage store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

from agentd import metrics
from agentd.errors import ErrorCode
from agentd.session.services import Refusal

if TYPE_CHECKING:
    from agentd.ratelimit import Decision
    from agentd.usage.budgets import BudgetDecision

# Counted for every prompt a gate lets through; bound once, as labels() is a locked lookup.
PROMPT_ALLOWED = metrics.RATELIMIT_DECISIONS.labels("prompts", "allowed")


class PromptRateLimit(Protocol):
    """``RateLimiter.check_prompt``: decides on a prompt and counts an accepted one."""

    def check_prompt(self, user: str) -> Deferred[Decision]: ...


class BudgetCheck(Protocol):
    """``Budgets.check``: refuses once this month's operator-paid spend reached a budget."""

    def check(self, user: str, project: str) -> Deferred[BudgetDecision]: ...


class PromptLimits:
    """A ``PromptGate`` over the prompt rate limit and the budgets, in that order."""

    def __init__(self, limiter: PromptRateLimit, budgets: BudgetCheck) -> None:
        self._limiter = limiter
        self._budgets = budgets

    def admit(self, user: str, project: str) -> Deferred[Refusal | None]:
        return self._limiter.check_prompt(user).addCallback(self._limited, user, project)

    def _limited(
        self, decision: Decision, user: str, project: str
    ) -> Refusal | Deferred[Refusal | None]:
        if not decision.allowed:
            return rate_limit_refusal(decision)
        PROMPT_ALLOWED.inc()
        return self._budgets.check(user, project).addCallback(budget_refusal)


def rate_limit_refusal(decision: Decision) -> Refusal:
    """The client's answer to a prompt the rate limit refused."""
    return Refusal(
        ErrorCode.RATE_LIMIT,
        "Rate limited. Please wait before sending another message.",
        {
            "retryAfter": decision.retry_after_ms,
            "policy": decision.policy,
            "limit": decision.limit,
            "window": decision.window_ms,
        },
        metrics.RATELIMIT_DECISIONS.labels("prompts", "rejected"),
    )


def budget_refusal(budget: BudgetDecision) -> Refusal | None:
    """The client's answer to a prompt a budget refused; None when the budgets allow it."""
    if budget.allowed:
        return None
    return Refusal(
        ErrorCode.QUOTA_EXCEEDED,
        f"Monthly budget reached for this {budget.scope}.",
        {
            "scope": budget.scope,
            "budget": budget.budget_usd,
            "spent": round(budget.spent_usd, 6),
        },
        metrics.BUDGET_REJECTIONS.labels(budget.scope or "user"),
    )
