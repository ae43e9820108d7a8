"""The prompt gate with Redis: the prompt rate limit and the budget read in one round trip.

``PromptLimits`` asks the limiter, then the budgets: two scripts, two round trips. When both
keep their keys in the same Redis, ``RedisPromptLimits`` sends one script instead, composed
of the limiter's ``SCRIPT`` and the budgets' ``SPEND_SCRIPT`` unchanged, so the algorithm, the
keys, the TTLs and Redis ``TIME`` stay theirs. The budget read runs only for a prompt the
limit accepts, and the decisions are made by the limiter's and the budgets' own Python.

A month total that is missing sends that prompt on to ``Budgets.check``, which rebuilds it. A
Redis known to be down, or a call that fails, sends the prompt the way of ``PromptLimits``,
whose parts then use their fallbacks; the failure is reported to the Redis's health first, as
the limiter reports its own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from agentd.ratelimit import SCRIPT, RateLimiter
from agentd.redishealth import RedisHealth
from agentd.redisstore import RedisStore
from agentd.session.gate import PROMPT_ALLOWED, PromptLimits, budget_refusal, rate_limit_refusal
from agentd.session.services import Refusal
from agentd.usage.budgets import Budgets
from agentd.usage.layout import (
    BUDGETS_KEY,
    budget_field,
    project_month_total_key,
    user_month_total_key,
)
from agentd.usage.redis_store import SPEND_SCRIPT
from agentd.usage.store import MonthSpend

# KEYS[1-2] the limiter's keys: the user's prompt log and override hash
# KEYS[3-5] the budgets' keys: the overrides hash, the user's and the project's month totals
# ARGV      the limiter's three arguments, then the budgets' two
# Returns   the limiter's reply alone when it refuses, else followed by the budget read's:
#           {1, limit, 0, user spend, project spend, user override, project override}.
# Each script runs as a function whose parameters shadow KEYS and ARGV, so both texts are
# used as they are.
PROMPT_SCRIPT = f"""
local function ratelimit(KEYS, ARGV)
{SCRIPT}
end
local function spend(KEYS, ARGV)
{SPEND_SCRIPT}
end
local decision = ratelimit({{KEYS[1], KEYS[2]}}, {{ARGV[1], ARGV[2], ARGV[3]}})
if decision[1] == 0 then
  return decision
end
local spent = spend({{KEYS[3], KEYS[4], KEYS[5]}}, {{ARGV[4], ARGV[5]}})
return {{decision[1], decision[2], decision[3], spent[1], spent[2], spent[3], spent[4]}}
"""


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisPromptLimits:
    """A ``PromptGate`` over a limiter and budgets that share ``store``: one script a prompt."""

    def __init__(
        self,
        store: RedisStore,
        health: RedisHealth,
        limiter: RateLimiter,
        budgets: Budgets,
    ) -> None:
        self._store = store
        self._health = health
        self._limiter = limiter
        self._budgets = budgets
        self._fallback = PromptLimits(limiter, budgets)

    def admit(self, user: str, project: str) -> Deferred[Refusal | None]:
        if not self._health.up:
            return self._fallback.admit(user, project)
        policy = self._limiter.prompts
        month = self._budgets.month()
        keys = [
            *policy.redis_keys(user),
            BUDGETS_KEY,
            user_month_total_key(user, month),
            project_month_total_key(project, month),
        ]
        args = [*policy.script_args, budget_field("user", user), budget_field("project", project)]
        try:
            answered = self._store.eval("prompt_gate", PROMPT_SCRIPT, keys, args)
        except Exception:
            return self._failed(Failure(), user, project)
        return answered.addCallbacks(
            self._decided,
            self._failed,
            callbackArgs=(user, project, month),
            errbackArgs=(user, project),
        )

    def _decided(
        self, reply: Any, user: str, project: str, month: str
    ) -> Refusal | Deferred[Refusal | None] | None:
        decision = self._limiter.decide_prompt(
            reply[:3] if isinstance(reply, list) else reply, user
        )
        if not decision.allowed:
            return rate_limit_refusal(decision)
        PROMPT_ALLOWED.inc()
        if len(reply) != 7 or int(reply[3]) < 0 or int(reply[4]) < 0:
            # A month total to rebuild from the day totals, or no budget read to decide on.
            return self._budgets.check(user, project).addCallback(budget_refusal)
        spend = MonthSpend(int(reply[3]), int(reply[4]), _text(reply[5]), _text(reply[6]))
        return budget_refusal(self._budgets.decide(spend, user, project, month))

    def _failed(self, failure: Failure, user: str, project: str) -> Deferred[Refusal | None]:
        self._health.failed(failure)
        return self._fallback.admit(user, project)
