"""RedisHealth on a Clock: down at the first failure, probed with backoff, up at the first
probe that succeeds, each change told once; and one state shared by every user of a Redis."""

from __future__ import annotations

import calendar
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from txredisapi import ConnectionError

from agentd import metrics
from agentd.config import UsageConfig
from agentd.pricing import PriceTable
from agentd.ratelimit import Policy, RateLimiter
from agentd.redishealth import RedisHealth
from agentd.usage.budgets import BudgetDecision
from agentd.usage.memory_store import MemoryUsageStore
from agentd.usage.recorder import UsageRecorder
from agentd.usage.records import UsageEvent, UsageRecord
from agentd.usage.spool import Spool
from agentd.usage.store import MonthSpend
from tests.harness import base_config, merge
from tests.servers import RedisServer

T = TypeVar("T")
NOW = calendar.timegm(datetime.datetime(2026, 11, 20, 12, 0, 0).timetuple())


class Probe:
    """A probe whose every answer the test gives."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Any]] = []

    def __call__(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(d)
        return d


class Observer:
    def __init__(self) -> None:
        self.heard: list[tuple[str, Any]] = []

    def redis_lost(self, failure: Failure) -> None:
        self.heard.append(("lost", failure.type))

    def redis_back(self, outage_seconds: float) -> None:
        self.heard.append(("back", outage_seconds))


def result_of(d: Deferred[T]) -> T:
    """What ``d`` has already fired with; fails the test if it has not."""
    box: list[T | Failure] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert not isinstance(box[0], Failure), box[0]
    return box[0]


def down() -> Failure:
    return Failure(ConnectionError("Not connected"))


def gauge() -> float | None:
    return metrics.REGISTRY.get_sample_value("agentd_ratelimit_degraded")


def next_delay(clock: Clock) -> float:
    (call,) = clock.getDelayedCalls()
    return round(call.getTime() - clock.seconds(), 6)


def run_next(clock: Clock) -> None:
    (call,) = clock.getDelayedCalls()
    clock.advance(call.getTime() - clock.seconds())


def test_the_first_failure_marks_redis_down_and_observers_hear_it_once() -> None:
    clock, probe, observer = Clock(), Probe(), Observer()
    health = RedisHealth(probe, clock)
    health.observe(observer)
    assert health.up and gauge() == 0
    health.failed(down())
    health.failed(Failure(TimeoutError()))
    assert not health.up and gauge() == 1
    assert observer.heard == [("lost", ConnectionError)]
    assert probe.calls == []  # the first probe waits for its delay


def test_probes_back_off_from_the_first_delay_up_to_the_cap() -> None:
    clock, probe = Clock(), Probe()
    health = RedisHealth(probe, clock, first_delay=0.25, max_delay=2.0)
    health.failed(down())
    delays = []
    for n in range(6):
        delays.append(next_delay(clock))
        run_next(clock)
        assert len(probe.calls) == n + 1
        probe.calls[-1].errback(down())
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert not health.up


def test_jitter_draws_each_delay_below_its_backoff() -> None:
    clock, probe = Clock(), Probe()
    draws = iter([0.5, 0.1, 1.0])
    health = RedisHealth(probe, clock, first_delay=1.0, max_delay=10.0, rand=lambda: next(draws))
    health.failed(down())
    delays = []
    for _ in range(3):
        delays.append(next_delay(clock))
        run_next(clock)
        probe.calls[-1].errback(down())
    assert delays == [0.5, 0.2, 4.0]


def test_the_first_probe_that_succeeds_marks_redis_up_once_and_probing_stops() -> None:
    clock, probe, observer = Clock(), Probe(), Observer()
    health = RedisHealth(probe, clock, first_delay=0.25)
    health.observe(observer)
    clock.advance(10)
    health.failed(down())
    run_next(clock)
    probe.calls[-1].errback(down())
    run_next(clock)
    probe.calls[-1].callback("OK")
    assert health.up and gauge() == 0
    assert observer.heard == [("lost", ConnectionError), ("back", 0.75)]
    assert clock.getDelayedCalls() == []


def test_a_new_outage_probes_from_the_first_delay_again() -> None:
    clock, probe, observer = Clock(), Probe(), Observer()
    health = RedisHealth(probe, clock, first_delay=0.25)
    health.observe(observer)
    for _ in range(2):
        health.failed(down())
        assert next_delay(clock) == 0.25
        run_next(clock)
        probe.calls[-1].errback(down())
        assert next_delay(clock) == 0.5
        run_next(clock)
        probe.calls[-1].callback("OK")
    assert [kind for kind, _ in observer.heard] == ["lost", "back", "lost", "back"]


def test_a_write_a_user_saw_succeed_brings_redis_back_before_the_probe() -> None:
    clock, probe, observer = Clock(), Probe(), Observer()
    health = RedisHealth(probe, clock)
    health.observe(observer)
    health.wrote()
    assert observer.heard == []
    health.failed(down())
    clock.advance(0.1)
    health.wrote()
    assert health.up
    assert observer.heard == [("lost", ConnectionError), ("back", 0.1)]
    assert clock.getDelayedCalls() == [] and probe.calls == []


def test_ping_asks_now_and_its_answer_changes_the_state_both_ways() -> None:
    clock, probe, observer = Clock(), Probe(), Observer()
    health = RedisHealth(probe, clock)
    health.observe(observer)
    failed = health.ping()
    probe.calls[-1].errback(down())
    assert not health.up
    assert failed.result.check(ConnectionError)
    failed.addErrback(lambda _: None)
    assert len(clock.getDelayedCalls()) == 1  # the scheduled probe is on its way
    answered = health.ping()
    probe.calls[-1].callback("OK")
    assert health.up and answered.result == "OK"
    assert clock.getDelayedCalls() == []  # and no longer needed
    assert [kind for kind, _ in observer.heard] == ["lost", "back"]


def test_a_late_probe_of_an_earlier_outage_does_not_double_the_probing() -> None:
    clock, probe = Clock(), Probe()
    health = RedisHealth(probe, clock, first_delay=0.25)
    health.failed(down())
    run_next(clock)
    late = probe.calls[-1]
    health.ping()
    probe.calls[-1].callback("OK")  # back while the scheduled probe is still out
    health.failed(down())  # and down again: this outage has its own probe
    late.errback(down())
    assert next_delay(clock) == 0.25


def test_stop_cancels_the_probe_and_a_probe_in_flight_schedules_no_other() -> None:
    clock, probe = Clock(), Probe()
    health = RedisHealth(probe, clock)
    health.failed(down())
    health.stop()
    assert clock.getDelayedCalls() == []

    health = RedisHealth(probe, clock)
    health.failed(down())
    run_next(clock)
    health.stop()
    probe.calls[-1].errback(down())
    assert clock.getDelayedCalls() == []
    assert not health.up


# One state for every user of a Redis.


class Scripts:
    """The limiter's Redis: every script call fails while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    def eval(
        self, operation: str, script: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Deferred[Any]:
        self.calls += 1
        if self.down:
            return fail(ConnectionError("Not connected"))
        return succeed([1, 5, 0])


class Usage(MemoryUsageStore):
    """The recorder's Redis: every write and budget read fails while ``down``."""

    def __init__(self) -> None:
        super().__init__(lambda: NOW)
        self.down = False
        self.calls = 0

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        self.calls += 1
        if self.down:
            return fail(ConnectionError("Not connected"))
        return super().apply(record, expire_at, month_expire_at)

    def spend(self, user: str, project: str, days: Sequence[datetime.date]) -> Deferred[MonthSpend]:
        self.calls += 1
        if self.down:
            return fail(ConnectionError("Not connected"))
        return super().spend(user, project, days)


class PendingScripts:
    """The limiter's Redis, whose every reply the test gives."""

    def __init__(self) -> None:
        self.replies: list[Deferred[Any]] = []

    def eval(
        self, operation: str, script: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.replies.append(d)
        return d


def test_an_accepted_hit_is_a_write_that_brings_redis_back_and_a_rejection_is_not() -> None:
    clock, scripts = Clock(), PendingScripts()
    health = RedisHealth(Probe(), clock)
    limiter = RateLimiter(
        Policy("prompts", 5, 1_000_000),
        Policy("connections", 5, 1_000_000),
        scripts,
        clock,
        health=health,
    )
    checks = [limiter.check_prompt("alice") for _ in range(3)]
    scripts.replies[0].errback(ConnectionError("Not connected"))
    assert limiter.degraded
    scripts.replies[1].callback([0, 5, 100_000])  # answered, but only read
    assert limiter.degraded
    scripts.replies[2].callback([1, 5, 0])
    assert not limiter.degraded and health.up
    assert [result_of(d).allowed for d in checks] == [True, False, True]


def usage_event(query_id: str) -> UsageEvent:
    return UsageEvent(query_id, "alice", "p1", "echo", "m", 10, 1, 0, 0, 0.01, NOW)


def test_an_outage_one_user_meets_is_every_users_outage_and_so_is_the_recovery(
    tmp_path: Path,
) -> None:
    clock, probe = Clock(), Probe()
    health = RedisHealth(probe, clock, first_delay=0.25)
    scripts, usage = Scripts(), Usage()
    limiter = RateLimiter(
        Policy("prompts", 5, 1_000_000),
        Policy("connections", 5, 1_000_000),
        scripts,
        clock,
        health=health,
    )
    recorder = UsageRecorder(
        usage, clock, PriceTable.empty(), spool=Spool(tmp_path), now=lambda: NOW, health=health
    )
    recorder.start()

    usage.down = True
    recorder.record(usage_event("q1"))
    clock.advance(UsageConfig().batch_ms / 1000)  # the record's batch window
    # The recorder met the failure; the limiter and the budget checks take their fallbacks
    # without calling Redis, and nobody waits for a timeout.
    assert limiter.degraded and not health.up
    assert result_of(limiter.check_prompt("alice")).allowed
    assert result_of(recorder.check_budget("alice", "p1")) == BudgetDecision(True, None, None, 0.0)
    assert (scripts.calls, usage.calls) == (0, 1)
    assert recorder.health()["redis"] is False

    usage.down = False
    run_next(clock)
    probe.calls[-1].callback("OK")
    clock.advance(0)
    # The probe's answer brings every user back at once; the spool is replayed.
    assert not limiter.degraded
    assert recorder.health() == {
        "ok": True,
        "spool_depth": 0,
        "spool_writable": True,
        "redis": True,
    }
    assert usage.calls == 2
    assert result_of(limiter.check_prompt("alice")).allowed
    assert scripts.calls == 1
    result_of(recorder.stop())


@pytest_twisted.ensureDeferred
async def test_health_learns_of_an_outage_for_the_limiter_and_usage_and_of_the_recovery(
    tmp_path: Path, redis_server: RedisServer, agentd: Any
) -> None:
    gateway = agentd(merge(base_config(tmp_path), redis={"url": redis_server.url}))
    limiter, usage = gateway.service.limiter, gateway.service.usage
    assert not limiter.degraded
    redis_server.stop()
    body = await (await treq.get(gateway.http + "/health")).json()
    assert body["checks"]["redis"]["status"] == "failed"
    # Neither the limiter nor usage has called Redis since: /health's failure is theirs.
    assert limiter.degraded
    assert usage.health()["redis"] is False
    redis_server.start()
    for _ in range(200):
        if not limiter.degraded:
            break
        await deferLater(reactor, 0.1, lambda: None)
    assert not limiter.degraded
    assert usage.health()["redis"] is True
