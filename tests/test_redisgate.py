"""The one-trip prompt gate against a real redis-server: one script, same answers, fallbacks."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime

from agentd.config import RateLimitConfig
from agentd.errors import ErrorCode
from agentd.ratelimit import RateLimiter
from agentd.redisgate import RedisPromptLimits
from agentd.redishealth import RedisHealth
from agentd.redisstore import RedisStore
from agentd.session.gate import PromptLimits
from agentd.session.services import Refusal
from agentd.usage.budgets import Budgets
from agentd.usage.layout import (
    month_of,
    project_month_total_key,
    user_day_key,
    user_month_total_key,
)
from agentd.usage.redis_store import RedisUsageStore
from tests.samples import sample
from tests.servers import RedisServer
from tests.test_ratelimit_redis import integer
from tests.waiting import eventually

reactor = cast(IReactorTime, _reactor)
MONTH = month_of(time.time())


class Parts:
    """A limiter and budgets sharing one store and health, and both gates over them."""

    def __init__(self, url: str, prompts: int, budget: float, timeout: float) -> None:
        self.store = RedisStore(url, reactor, timeout=timeout)
        self.health = RedisHealth.of_store(self.store, reactor)
        config = RateLimitConfig(prompts_per_minute=prompts)
        self.limiter = RateLimiter.from_config(config, self.store, reactor, self.health)
        self.budgets = Budgets(
            RedisUsageStore(self.store),
            self.health,
            monthly_budget_usd=budget,
            soft_budget_ratio=1.0,
            now=time.time,
        )
        self.gate = RedisPromptLimits(self.store, self.health, self.limiter, self.budgets)
        self.two_trips = PromptLimits(self.limiter, self.budgets)


Connect = Callable[..., Parts]


@pytest_twisted.async_yield_fixture
async def connect(redis_server: RedisServer) -> AsyncIterator[Connect]:
    made: list[Parts] = []

    # A deadline a loaded machine meets on a call that connects and loads the script: these
    # tests are about answers. The outage test sets the production deadline itself.
    def connect(prompts: int = 60, budget: float = 100.0, timeout: float = 5.0) -> Parts:
        parts = Parts(redis_server.url, prompts, budget, timeout)
        made.append(parts)
        return parts

    yield connect
    for parts in made:
        parts.health.stop()
        await parts.store.disconnect()


def set_totals(
    server: RedisServer, user_micro: int, project_micro: int = 0, user: str = "alice"
) -> None:
    server.cli("set", user_month_total_key(user, MONTH), str(user_micro))
    server.cli("set", project_month_total_key("demo", MONTH), str(project_micro))


def scripts_run(server: RedisServer) -> int:
    calls = server.command_calls()
    return calls.get("evalsha", 0) + calls.get("eval", 0)


def admit(gate: Any, user: str = "alice") -> Deferred[Refusal | None]:
    return gate.admit(user, "demo")


def decisions(result: str) -> float:
    return sample("agentd_ratelimit_decisions_total", policy="prompts", result=result)


@pytest_twisted.ensureDeferred
async def test_a_prompt_is_one_script_call_when_the_month_totals_exist(
    connect: Connect, redis_server: RedisServer
) -> None:
    parts = connect()
    set_totals(redis_server, 1_000_000)
    assert await admit(parts.gate) is None
    redis_server.cli("config", "resetstat")
    allowed = decisions("allowed")
    for _ in range(20):
        assert await admit(parts.gate) is None
    assert scripts_run(redis_server) == 20
    assert decisions("allowed") == allowed + 20
    assert sample("agentd_redis_latency_seconds_count", operation="prompt_gate") >= 21


@pytest_twisted.ensureDeferred
async def test_a_missing_month_total_is_rebuilt_by_the_budget_check_for_that_prompt_only(
    connect: Connect, redis_server: RedisServer
) -> None:
    parts = connect(budget=1.0)
    today = datetime.datetime.now(datetime.UTC).date()
    redis_server.cli("hset", user_day_key("alice", today), "cost", "1500000")
    redis_server.cli("config", "resetstat")
    refusal = await admit(parts.gate)
    # The gate's script, then the budgets' read and its rebuild of the missing totals.
    assert scripts_run(redis_server) == 3
    assert refusal is not None and refusal.code is ErrorCode.QUOTA_EXCEEDED
    assert dict(refusal.fields) == {"scope": "user", "budget": 1.0, "spent": 1.5}
    assert redis_server.cli("get", user_month_total_key("alice", MONTH)).strip() == '"1500000"'
    redis_server.cli("config", "resetstat")
    assert (await admit(parts.gate)) == refusal
    assert scripts_run(redis_server) == 1


@pytest_twisted.ensureDeferred
async def test_refusals_are_those_of_the_two_trip_gate(
    connect: Connect, redis_server: RedisServer
) -> None:
    parts = connect(prompts=3, budget=5.0)
    redis_server.cli("hset", "rl:{alice}:limits", "prompts", "2")
    set_totals(redis_server, 4_000_000, 0)
    redis_server.cli("hset", "{usage}:budgets", "project:demo", "3.5")
    redis_server.cli("set", project_month_total_key("demo", MONTH), "3500000")

    one = await admit(parts.gate)
    two = await admit(parts.two_trips)
    assert one is not None and one == two
    assert one.code is ErrorCode.QUOTA_EXCEEDED
    assert dict(one.fields) == {"scope": "project", "budget": 3.5, "spent": 3.5}

    one, two = await admit(parts.gate), await admit(parts.two_trips)
    assert one is not None and two is not None
    assert one.code is two.code is ErrorCode.RATE_LIMIT
    assert one.text == two.text and one.metric is two.metric
    assert dict(one.fields).keys() == dict(two.fields).keys()
    assert {k: v for k, v in one.fields.items() if k != "retryAfter"} == {
        "policy": "prompts",
        "limit": 2,
        "window": 60_000,
    }
    assert 0 < one.fields["retryAfter"] <= 60_000


@pytest_twisted.ensureDeferred
async def test_360_concurrent_prompts_over_three_gates_admit_exactly_60(
    connect: Connect, redis_server: RedisServer
) -> None:
    gates = [connect().gate for _ in range(3)]
    set_totals(redis_server, 0)
    refusals = await gatherResults([admit(gates[n % 3]) for n in range(360)])
    assert sum(refusal is None for refusal in refusals) == 60
    assert {r.code for r in refusals if r is not None} == {ErrorCode.RATE_LIMIT}
    assert integer(redis_server.cli("llen", "rl:{alice}:prompts")) == 60


@pytest_twisted.ensureDeferred
async def test_a_stopped_redis_sends_prompts_to_the_fallbacks_and_back(
    connect: Connect, redis_server: RedisServer
) -> None:
    parts = connect(prompts=5)
    set_totals(redis_server, 0)
    errors = sample("agentd_redis_errors_total", operation="prompt_gate")
    for _ in range(2):
        assert await admit(parts.gate) is None
    # Connected and the script loaded: calls to the stopped Redis now fail at the deadline
    # agentd runs with.
    parts.store.timeout = 0.1
    redis_server.stop()

    refusals = await gatherResults([admit(parts.gate) for _ in range(10)])
    # The in-process log remembers the two Redis accepted; budgets cannot say, so allow.
    assert sum(refusal is None for refusal in refusals) == 3
    assert {r.code for r in refusals if r is not None} == {ErrorCode.RATE_LIMIT}
    assert not parts.health.up and parts.limiter.degraded
    assert sample("agentd_redis_errors_total", operation="prompt_gate") > errors

    redis_server.start()
    await eventually(lambda: parts.health.up, timeout=20, what="recovery")
    set_totals(redis_server, 0, user="bob")
    redis_server.cli("config", "resetstat")
    assert await admit(parts.gate, "bob") is None
    assert scripts_run(redis_server) == 1
    assert integer(redis_server.cli("llen", "rl:{bob}:prompts")) == 1
