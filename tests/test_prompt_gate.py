"""The prompt gate: the rate limit first, then the budgets, refusals as the client sees them."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from agentd.errors import ErrorCode
from agentd.ratelimit import Decision
from agentd.session.gate import PromptLimits
from agentd.session.services import Refusal
from agentd.usage.budgets import BudgetDecision
from tests.samples import sample
from tests.test_session import KEY, FakeClient, make, opened

ALLOWED = Decision(allowed=True, policy="prompts", limit=60, window_ms=60_000, retry_after_ms=0)
LIMITED = Decision(allowed=False, policy="prompts", limit=2, window_ms=60_000, retry_after_ms=1234)
WITHIN_BUDGET = BudgetDecision(True, 10.0, 10.0, 1.5)
OVER_BUDGET = BudgetDecision(False, "project", 5.0, 5.123456789)


class FakeLimiter:
    def __init__(self, decision: Decision, asked: list[str]) -> None:
        self.decision = decision
        self.asked = asked

    def check_prompt(self, user: str) -> Deferred[Decision]:
        self.asked.append(f"limit {user}")
        return succeed(self.decision)


class FakeBudgets:
    def __init__(self, decision: BudgetDecision, asked: list[str]) -> None:
        self.decision = decision
        self.asked = asked

    def check(self, user: str, project: str) -> Deferred[BudgetDecision]:
        self.asked.append(f"budget {user} {project}")
        return succeed(self.decision)


def gate(limit: Decision, budget: BudgetDecision) -> tuple[PromptLimits, list[str]]:
    asked: list[str] = []
    return PromptLimits(FakeLimiter(limit, asked), FakeBudgets(budget, asked)), asked


def admit(prompt_gate: PromptLimits) -> Refusal | None:
    results: list[Refusal | None] = []
    prompt_gate.admit("alice", "demo").addCallback(results.append)
    [result] = results
    return result


def decisions(result: str) -> float:
    return sample("agentd_ratelimit_decisions_total", policy="prompts", result=result)


def test_a_prompt_within_both_limits_is_admitted_after_the_rate_limit_then_the_budget():
    prompt_gate, asked = gate(ALLOWED, WITHIN_BUDGET)
    allowed = decisions("allowed")
    assert admit(prompt_gate) is None
    assert asked == ["limit alice", "budget alice demo"]
    assert decisions("allowed") == allowed + 1


def test_a_rate_limit_refusal_does_not_consult_the_budget_and_carries_the_limit_fields():
    prompt_gate, asked = gate(LIMITED, OVER_BUDGET)
    rejected = decisions("rejected")
    refusal = admit(prompt_gate)
    assert asked == ["limit alice"]
    assert refusal is not None
    assert refusal.code is ErrorCode.RATE_LIMIT
    assert refusal.text == "Rate limited. Please wait before sending another message."
    assert dict(refusal.fields) == {
        "retryAfter": 1234,
        "policy": "prompts",
        "limit": 2,
        "window": 60_000,
    }
    assert decisions("rejected") == rejected, "counted when sent, not when decided"
    refusal.metric.inc()
    assert decisions("rejected") == rejected + 1


def test_a_budget_refusal_comes_after_an_allowed_rate_limit_and_carries_the_budget_fields():
    prompt_gate, asked = gate(ALLOWED, OVER_BUDGET)
    allowed = decisions("allowed")
    rejections = sample("agentd_budget_rejections_total", scope="project")
    refusal = admit(prompt_gate)
    assert asked == ["limit alice", "budget alice demo"]
    assert decisions("allowed") == allowed + 1, "the prompt counts against the rate limit"
    assert refusal is not None
    assert refusal.code is ErrorCode.QUOTA_EXCEEDED
    assert refusal.text == "Monthly budget reached for this project."
    assert dict(refusal.fields) == {"scope": "project", "budget": 5.0, "spent": 5.123457}
    refusal.metric.inc()
    assert sample("agentd_budget_rejections_total", scope="project") == rejections + 1


def test_a_refused_prompt_reaches_the_client_as_an_error_and_never_the_agent():
    prompt_gate, _ = gate(LIMITED, WITHIN_BUDGET)
    _, transport, registry = make(gate=prompt_gate)
    client = FakeClient()
    session = opened(registry, KEY, client)
    rejected = decisions("rejected")
    errors = sample("agent_errors_total", agent="echo", error_type="rate_limit")
    session.prompt("p1", "hi")
    error: dict[str, Any] = client.frames[-1]
    assert list(error.items()) == list(
        {
            "type": "error",
            "code": "rate_limit",
            "error": "Rate limited. Please wait before sending another message.",
            "id": "p1",
            "retryAfter": 1234,
            "policy": "prompts",
            "limit": 2,
            "window": 60_000,
        }.items()
    ), "the fields, in the order the client has always had them (an answer: no seq)"
    assert transport.attaches == []
    assert decisions("rejected") == rejected + 1
    assert sample("agent_errors_total", agent="echo", error_type="rate_limit") == errors + 1
