"""The in-process sliding-window log and the limiter's fallback, probe and recovery, on a Clock."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from txredisapi import ConnectionError, ResponseError
from zope.interface import implementer

from agentd import metrics
from agentd.config import RateLimitConfig
from agentd.ratelimit import Decision, Policy, RateLimiter, SlidingWindowLog

SECOND = 1_000_000


def at(clock: Clock, us: int) -> None:
    """Move ``clock`` forward to ``us`` microseconds after its start."""
    clock.advance(us / SECOND - clock.seconds())


def result(d: Deferred[Decision]) -> Decision:
    """The Decision ``d`` already holds; fails the test if ``d`` is pending or failed."""
    box: list[Decision | Failure] = []
    d.addBoth(box.append)
    assert len(box) == 1, "the decision is still pending"
    assert isinstance(box[0], Decision), box[0]
    return box[0]


@dataclass
class Call:
    operation: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    reply: Deferred[Any]


class FakeRedis:
    """A ScriptRunner that records calls and leaves each reply to the test."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def eval(
        self, operation: str, script: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(Call(operation, tuple(keys), tuple(args), d))
        return d


@implementer(ILogObserver)
class Captured:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "agentd.ratelimit":
            self.events.append(event)

    def levels(self) -> list[str]:
        return [event["log_level"].name for event in self.events]


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()
    globalLogPublisher.addObserver(captured)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured)


def degraded_gauge() -> float | None:
    return metrics.REGISTRY.get_sample_value("agentd_ratelimit_degraded")


def decisions_count(policy: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "agentd_ratelimit_decisions_total", {"policy": policy, "result": result}
    )
    return value or 0.0


def limiter(
    store: FakeRedis | None, clock: Clock, prompts: int = 5, connections: int = 3
) -> RateLimiter:
    return RateLimiter(
        Policy("prompts", prompts, SECOND),
        Policy("connections", connections, SECOND),
        store,
        clock,
        probe_initial_seconds=0.25,
        probe_max_seconds=2.0,
    )


# The in-process log.


def test_log_accepts_the_limit_then_waits_for_the_oldest_hit_to_leave_the_window() -> None:
    clock = Clock()
    log = SlidingWindowLog(SECOND, clock)
    for t in (0, 100_000, 200_000):
        at(clock, t)
        assert log.hit("alice", 3) == 0
    at(clock, 500_000)
    assert log.hit("alice", 3) == 500_000
    at(clock, 999_999)
    assert log.hit("alice", 3) == 1
    at(clock, SECOND)
    assert log.hit("alice", 3) == 0
    assert log.hit("alice", 3) == 100_000


def test_log_never_holds_more_than_the_limit_in_any_window_and_rejects_only_then() -> None:
    rng = random.Random(7)
    clock = Clock()
    log = SlidingWindowLog(SECOND, clock)
    limit = 5
    # Bursts on and around window edges, then scattered hits, 40 windows in all.
    arrivals = sorted(
        [edge * SECOND + rng.randint(-3_000, 3_000) for edge in range(1, 40) for _ in range(8)]
        + [rng.randint(0, 40 * SECOND) for _ in range(600)]
    )
    accepted: list[int] = []
    for t in arrivals:
        at(clock, t)
        wait = log.hit("alice", limit)
        in_window = [a for a in accepted if a > t - SECOND]
        if wait == 0:
            assert len(in_window) < limit
            accepted.append(t)
        else:
            # Rejected only when full, and told exactly when the oldest counted hit leaves.
            assert len(in_window) == limit
            assert wait == in_window[0] + SECOND - t
    assert len(accepted) > 150
    for first, last in zip(accepted, accepted[limit:], strict=False):
        assert last - first >= SECOND


def test_log_forgets_users_whose_newest_hit_left_the_window() -> None:
    clock = Clock()
    log = SlidingWindowLog(SECOND, clock)
    for n in range(1_000):
        log.hit(f"user{n}", 60)
    at(clock, SECOND // 2)
    log.hit("active", 60)
    assert len(log) == 1_001
    at(clock, SECOND)
    log.hit("active", 60)
    assert len(log) == 1
    at(clock, 5 * SECOND)
    log.record("other", 60)
    assert len(log) == 1


def test_log_keeps_no_more_hits_per_user_than_the_limit() -> None:
    clock = Clock()
    log = SlidingWindowLog(SECOND, clock)
    for n in range(100):
        at(clock, n * 300_000)
        assert log.hit("alice", 5) == 0
    log.record("alice", 3)
    # The memory bound: what a decision can need, and no more.
    assert len(log._logs["alice"]) == 3


def test_log_keeps_its_order_when_the_clock_steps_back() -> None:
    clock = Clock()
    clock.advance(10.0)
    log = SlidingWindowLog(SECOND, clock)
    assert log.hit("alice", 2) == 0
    clock.rightNow = 9.5
    assert log.hit("alice", 2) == 0
    # Both hits count as 10.0: the window frees up one second after that, not after 9.5.
    assert log.hit("alice", 2) == 1_500_000


# The limiter without Redis.


def test_without_redis_the_in_process_log_limits_and_nothing_is_degraded() -> None:
    clock = Clock()
    rl = RateLimiter.from_config(RateLimitConfig(), None, clock)
    decisions = [result(rl.check_prompt("alice")) for _ in range(61)]
    assert [d.allowed for d in decisions] == [True] * 60 + [False]
    assert decisions[-1] == Decision(False, "prompts", 60, 60_000, 60_000)
    assert not rl.degraded
    assert clock.getDelayedCalls() == []


def test_from_config_takes_limits_and_window_from_the_ratelimit_section() -> None:
    clock = Clock()
    config = RateLimitConfig(prompts_per_minute=2, connections_per_minute=3, window_seconds=2.5)
    rl = RateLimiter.from_config(config, None, clock)
    prompts = [result(rl.check_prompt("alice")) for _ in range(3)]
    handshakes = [result(rl.check_handshake("alice")) for _ in range(4)]
    assert [d.allowed for d in prompts] == [True, True, False]
    assert [d.allowed for d in handshakes] == [True, True, True, False]
    assert prompts[-1] == Decision(False, "prompts", 2, 2_500, 2_500)
    assert handshakes[-1] == Decision(False, "connections", 3, 2_500, 2_500)


def test_retry_after_is_exact_to_the_millisecond_and_rounded_up() -> None:
    clock = Clock()
    rl = limiter(None, clock, prompts=2)
    at(clock, 400)
    result(rl.check_prompt("alice"))
    at(clock, 250_000)
    result(rl.check_prompt("alice"))
    at(clock, 300_000)
    rejected = result(rl.check_prompt("alice"))
    # The first prompt leaves the window at 1.0004 s: 700.4 ms from now, so 701 ms.
    assert rejected.retry_after_ms == 701
    at(clock, 300_000 + 700_000)
    assert result(rl.check_prompt("alice")).retry_after_ms == 1
    at(clock, 300_000 + 701_000)
    assert result(rl.check_prompt("alice")).allowed


def test_prompts_handshakes_and_users_have_separate_budgets() -> None:
    clock = Clock()
    rl = limiter(None, clock, prompts=2, connections=1)
    assert [result(rl.check_prompt("alice")).allowed for _ in range(3)] == [True, True, False]
    assert [result(rl.check_handshake("alice")).allowed for _ in range(2)] == [True, False]
    assert result(rl.check_prompt("bob")).allowed


def test_the_limiter_leaves_counting_decisions_to_its_callers() -> None:
    """The gateway and the session count every decision they get; counting here too would
    count each twice."""
    clock = Clock()
    rl = limiter(None, clock, prompts=1, connections=1)
    labels = [(p, r) for p in ("prompts", "connections") for r in ("allowed", "rejected")]
    before = [decisions_count(p, r) for p, r in labels]
    for _ in range(3):
        result(rl.check_prompt("alice"))
        result(rl.check_handshake("alice"))
    assert [decisions_count(p, r) for p, r in labels] == before


# The limiter with Redis: replies, fallback, probing and recovery.


def test_redis_replies_become_decisions_with_the_callers_keys_and_arguments() -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock)
    allowed, rejected = rl.check_prompt("alice"), rl.check_handshake("alice")
    assert [(c.operation, c.keys, c.args) for c in redis.calls] == [
        ("ratelimit", ("rl:{alice}:prompts", "rl:{alice}:limits"), (b"5", b"1000000", b"prompts")),
        (
            "ratelimit",
            ("rl:{alice}:connections", "rl:{alice}:limits"),
            (b"3", b"1000000", b"connections"),
        ),
    ]
    redis.calls[0].reply.callback([1, 5, 0])
    redis.calls[1].reply.callback([0, 3, 412_001])
    assert result(allowed) == Decision(True, "prompts", 5, 1_000, 0)
    assert result(rejected) == Decision(False, "connections", 3, 1_000, 413)
    assert not rl.degraded


@pytest.mark.parametrize(
    "failure",
    [
        TimeoutError(0.1, "Deferred"),
        ConnectionError("Not connected"),
        ResponseError("OOM command not allowed"),
        RuntimeError("anything else"),
    ],
    ids=["timeout", "disconnected", "error-reply", "unexpected"],
)
def test_a_redis_failure_is_answered_from_the_in_process_log_and_logged_once(
    failure: Exception, logs: Captured
) -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock)
    first, second = rl.check_prompt("alice"), rl.check_prompt("alice")
    redis.calls[0].reply.errback(failure)
    redis.calls[1].reply.errback(failure)
    assert result(first).allowed and result(second).allowed
    assert rl.degraded
    assert degraded_gauge() == 1
    # Further checks do not wait on Redis: they are answered at once, in process.
    later = [result(rl.check_prompt("alice")) for _ in range(4)]
    assert [d.allowed for d in later] == [True, True, True, False]
    assert later[-1].retry_after_ms == 1_000
    assert len(redis.calls) == 2
    assert logs.levels() == ["warn"]
    rl.stop()


def test_a_malformed_reply_falls_back_instead_of_failing() -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock)
    d = rl.check_prompt("alice")
    redis.calls[0].reply.callback("OK")
    assert result(d).allowed
    assert rl.degraded
    rl.stop()


def test_the_fallback_starts_from_the_prompts_redis_accepted_here() -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock, prompts=5)
    for n in range(3):
        d = rl.check_prompt("alice")
        redis.calls[n].reply.callback([1, 5, 0])
        assert result(d).allowed
    d = rl.check_prompt("alice")
    redis.calls[3].reply.errback(TimeoutError(0.1, "Deferred"))
    assert result(d).allowed
    assert [result(rl.check_prompt("alice")).allowed for _ in range(2)] == [True, False]
    rl.stop()


def test_the_fallback_applies_the_override_redis_last_reported() -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock, prompts=5)
    d = rl.check_prompt("alice")
    redis.calls[0].reply.callback([1, 2, 0])
    assert result(d).limit == 2
    d = rl.check_prompt("alice")
    redis.calls[1].reply.errback(TimeoutError(0.1, "Deferred"))
    assert result(d) == Decision(True, "prompts", 2, 1_000, 0)
    assert result(rl.check_prompt("alice")) == Decision(False, "prompts", 2, 1_000, 1_000)
    assert result(rl.check_prompt("bob")).limit == 5
    rl.stop()


def test_an_override_removed_in_redis_is_forgotten_for_the_fallback() -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock, prompts=5)
    rl.check_prompt("alice")
    redis.calls[0].reply.callback([1, 1, 0])
    rl.check_prompt("alice")
    redis.calls[1].reply.callback([1, 5, 0])
    rl.check_prompt("alice")
    redis.calls[2].reply.errback(TimeoutError(0.1, "Deferred"))
    assert [result(rl.check_prompt("alice")).limit for _ in range(3)] == [5, 5, 5]
    rl.stop()


def test_probes_back_off_while_redis_fails_and_a_success_returns_to_redis(
    logs: Captured,
) -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock)
    rl.check_prompt("alice")
    redis.calls[0].reply.errback(ConnectionError("Not connected"))
    delays = []
    for _ in range(5):
        (call,) = clock.getDelayedCalls()
        delays.append(round(call.getTime() - clock.seconds(), 6))
        clock.advance(call.getTime() - clock.seconds())
        probe = redis.calls[-1]
        assert (probe.operation, probe.keys, probe.args) == (
            "ratelimit_probe",
            ("rl:{#probe}:probe", "rl:{#probe}:limits"),
            (b"1", b"1000", b"probe"),
        )
        probe.reply.errback(TimeoutError(0.1, "Deferred"))
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert rl.degraded
    (call,) = clock.getDelayedCalls()
    clock.advance(call.getTime() - clock.seconds())
    redis.calls[-1].reply.callback([1, 1, 0])
    assert not rl.degraded
    assert degraded_gauge() == 0
    assert clock.getDelayedCalls() == []
    assert logs.levels() == ["warn", "info"]
    calls = len(redis.calls)
    d = rl.check_prompt("alice")
    assert len(redis.calls) == calls + 1
    redis.calls[-1].reply.callback([1, 5, 0])
    assert result(d).allowed


def test_a_new_outage_probes_from_the_initial_delay_and_logs_again(logs: Captured) -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock)
    for _ in range(2):
        rl.check_prompt("alice")
        redis.calls[-1].reply.errback(ConnectionError("Not connected"))
        clock.advance(0.25)
        redis.calls[-1].reply.errback(ConnectionError("Not connected"))
        clock.advance(0.5)
        redis.calls[-1].reply.callback([1, 1, 0])
        assert not rl.degraded
    # Each outage's first probe came 0.25 s after it began, not after the last backoff.
    assert [c.operation for c in redis.calls] == [
        "ratelimit",
        "ratelimit_probe",
        "ratelimit_probe",
    ] * 2
    assert logs.levels() == ["warn", "info", "warn", "info"]


def test_stop_cancels_the_probe_and_a_probe_in_flight_schedules_no_other() -> None:
    clock, redis = Clock(), FakeRedis()
    rl = limiter(redis, clock)
    rl.check_prompt("alice")
    redis.calls[0].reply.errback(ConnectionError("Not connected"))
    assert len(clock.getDelayedCalls()) == 1
    rl.stop()
    assert clock.getDelayedCalls() == []

    rl = limiter(redis, clock)
    rl.check_prompt("bob")
    redis.calls[-1].reply.errback(ConnectionError("Not connected"))
    clock.advance(0.25)
    in_flight = redis.calls[-1]
    assert in_flight.operation == "ratelimit_probe"
    rl.stop()
    in_flight.reply.errback(ConnectionError("Not connected"))
    assert clock.getDelayedCalls() == []
