"""The Redis limiter against a real redis-server: exactness, TTLs, outages, recovery."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from agentd.ratelimit import Decision, Policy, RateLimiter
from agentd.redisstore import RedisStore
from tests.samples import sample
from tests.servers import RedisServer
from tests.waiting import eventually, wait_until

reactor = cast(IReactorTime, _reactor)
ROOT = Path(__file__).resolve().parent.parent
SECOND = 1_000_000

# A separate agentd-like process: "burst URL USER N" connects, says "ready", and on a line
# on stdin fires N concurrent prompt checks and prints how many were accepted; "hammer URL"
# checks prompts for rotating users, 50 at a time, until it is killed.
CLIENT = """
import json, sys
from twisted.internet import defer, task, threads
from agentd.ratelimit import Policy, RateLimiter
from agentd.redisstore import RedisStore

async def main(reactor):
    mode, url = sys.argv[1], sys.argv[2]
    store = RedisStore(url, reactor, timeout=5.0)
    limiter = RateLimiter(Policy("prompts", 60, 60_000_000), Policy("connections", 30,
                          60_000_000), store, reactor)
    await store.call("ping", lambda c: c.ping())
    if mode == "burst":
        user, n = sys.argv[3], int(sys.argv[4])
        print("ready", flush=True)
        await threads.deferToThread(sys.stdin.readline)
        decisions = await defer.gatherResults([limiter.check_prompt(user) for _ in range(n)])
        print(json.dumps({"allowed": sum(d.allowed for d in decisions),
                          "degraded": limiter.degraded}))
        return
    print("started", flush=True)
    n = 0
    while True:
        await defer.gatherResults(
            [limiter.check_prompt(f"user{(n + i) % 997}") for i in range(50)])
        n += 50

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""

# Keys without a TTL, found in one atomic pass.
NO_TTL = (
    "local out = {} for _, k in ipairs(redis.call('KEYS', '*')) do "
    "if redis.call('PTTL', k) < 0 then table.insert(out, k) end end return out"
)


def sleep(seconds: float) -> Any:
    """Wait out part of a rate-limit window: the passing time is what these tests test."""
    return deferLater(reactor, max(0.0, seconds), lambda: None)


def lines(output: str) -> list[str]:
    """redis-cli array output as plain strings."""
    out = []
    for line in output.splitlines():
        text = line.split(") ", 1)[-1] if ") " in line else line
        if text and text != "(empty array)":
            out.append(text.strip('"'))
    return out


def integer(output: str) -> int:
    return int(output.replace("(integer)", "").strip())


def info(server: RedisServer, section: str) -> dict[str, str]:
    fields = {}
    for line in server.cli("info", section).splitlines():
        if ":" in line:
            name, value = line.split(":", 1)
            fields[name] = value.strip()
    return fields


def redis_errors(operation: str) -> float:
    return sample("agentd_redis_errors_total", operation=operation)


@implementer(ILogObserver)
class Captured:
    def __init__(self) -> None:
        self.levels: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "agentd.ratelimit":
            self.levels.append(event["log_level"].name)


@pytest.fixture
def logs() -> Iterator[Captured]:
    captured = Captured()
    globalLogPublisher.addObserver(captured)
    try:
        yield captured
    finally:
        globalLogPublisher.removeObserver(captured)


Connect = Callable[..., RateLimiter]


@pytest_twisted.async_yield_fixture
async def connect(redis_server: RedisServer) -> AsyncIterator[Connect]:
    """Build limiters, each on its own connection pool to the test's redis-server."""
    made: list[tuple[RateLimiter, RedisStore]] = []

    def connect(
        prompts: int = 60,
        window: float = 60.0,
        connections: int = 30,
        # A deadline a loaded machine meets on a call that connects and loads the script;
        # the outage tests ask for agentd's own, 0.1 s.
        timeout: float = 5.0,
        probe_max: float = 0.4,
        poolsize: int = 4,
    ) -> RateLimiter:
        store = RedisStore(redis_server.url, reactor, timeout=timeout, poolsize=poolsize)
        window_us = round(window * SECOND)
        limiter = RateLimiter(
            Policy("prompts", prompts, window_us),
            Policy("connections", connections, window_us),
            store,
            reactor,
            probe_initial_seconds=0.05,
            probe_max_seconds=probe_max,
        )
        made.append((limiter, store))
        return limiter

    yield connect
    for limiter, store in made:
        limiter.stop()
        await store.disconnect()


def client(server: RedisServer, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, args[0], server.url, *args[1:]],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


# Exactness.


@pytest_twisted.ensureDeferred
async def test_360_concurrent_prompts_over_three_connection_pools_accept_exactly_60(
    connect: Connect, redis_server: RedisServer
) -> None:
    limiters = [connect() for _ in range(3)]
    decisions = await gatherResults([limiters[n % 3].check_prompt("alice") for n in range(360)])
    assert sum(d.allowed for d in decisions) == 60
    assert not any(limiter.degraded for limiter in limiters)
    assert integer(redis_server.cli("llen", "rl:{alice}:prompts")) == 60


def test_400_prompts_from_four_processes_at_once_accept_exactly_60(
    redis_server: RedisServer,
) -> None:
    processes = [client(redis_server, "burst", "alice", "100") for _ in range(4)]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    # All four are connected: let them go together.
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    results = [json.loads(p.communicate(timeout=30)[0]) for p in processes]
    assert [r["degraded"] for r in results] == [False] * 4
    assert sum(r["allowed"] for r in results) == 60


@pytest_twisted.ensureDeferred
async def test_bursts_at_window_edges_never_put_more_than_the_limit_in_any_window(
    connect: Connect, redis_server: RedisServer
) -> None:
    """5 per second. Accept times come from the log itself: Redis time, to the microsecond."""
    limiter = connect(prompts=5, window=1.0, timeout=1.0)
    stamps: list[int] = []

    async def burst(size: int, fire_at_us: int | None = None) -> int:
        if fire_at_us is not None:  # a chosen instant relative to earlier accepts
            await sleep(fire_at_us / SECOND - time.time())
        decisions = await gatherResults([limiter.check_prompt("alice") for _ in range(size)])
        accepted = sum(d.allowed for d in decisions)
        if accepted:
            log = lines(redis_server.cli("lrange", "rl:{alice}:prompts", "0", str(accepted - 1)))
            stamps.extend(sorted(int(s) for s in log))
        return accepted

    assert await burst(3) == 3
    a_last = stamps[-1]
    assert await burst(10, a_last + 700_000) == 2
    b_last = stamps[-1]
    assert await burst(10, a_last + 1_100_000) == 3  # A has left; B still counts.
    c_first, c_last = stamps[-3], stamps[-1]
    assert await burst(10, b_last + 1_100_000) == 2  # B has left; C still counts.
    d_first, d_last = stamps[-2], stamps[-1]
    assert await burst(10, c_last + 1_100_000) == 3  # C has left; D still counts.
    # Just before D's first stamp leaves, nothing fits; just after D's last, two do.
    assert await burst(10, d_first + SECOND - 40_000) == 0
    assert await burst(10, d_last + SECOND + 40_000) == 2
    assert c_first < d_first
    assert stamps == sorted(stamps) and len(stamps) == 15
    for first, last in zip(stamps, stamps[5:], strict=False):
        assert last - first >= SECOND
    assert not limiter.degraded


@pytest_twisted.ensureDeferred
async def test_retry_after_is_exact_against_redis_time(
    connect: Connect, redis_server: RedisServer
) -> None:
    limiter = connect(prompts=5, window=1.0, timeout=1.0)
    for _ in range(5):
        assert (await limiter.check_prompt("alice")).allowed
    oldest = int(lines(redis_server.cli("lindex", "rl:{alice}:prompts", "4"))[0])
    sent = time.time()
    rejected = await limiter.check_prompt("alice")
    replied = time.time()
    assert not rejected.allowed
    # Decided by Redis between sending and the reply: retryAfter is what was left then.
    leaves = oldest + SECOND
    assert math.ceil((leaves - replied * SECOND) / 1000) <= rejected.retry_after_ms
    assert rejected.retry_after_ms <= math.ceil((leaves - sent * SECOND) / 1000)

    # Redis decided after ``sent`` and before ``replied``: measuring the waits from those
    # instants makes "early" early and "on time" on time whatever the round trip took.
    await sleep(sent + rejected.retry_after_ms / 1000 - 0.02 - time.time())
    early = await limiter.check_prompt("alice")
    assert not early.allowed and 1 <= early.retry_after_ms <= 20
    await sleep(replied + rejected.retry_after_ms / 1000 + 0.003 - time.time())
    assert (await limiter.check_prompt("alice")).allowed


@pytest_twisted.ensureDeferred
async def test_an_override_in_redis_applies_at_once_and_its_removal_too(
    connect: Connect, redis_server: RedisServer
) -> None:
    limiter = connect(prompts=3, connections=2)
    redis_server.cli("hset", "rl:{carol}:limits", "prompts", "5", "connections", "1")
    prompts = [await limiter.check_prompt("carol") for _ in range(6)]
    assert [d.allowed for d in prompts] == [True] * 5 + [False]
    assert {d.limit for d in prompts} == {5}
    handshakes = [await limiter.check_handshake("carol") for _ in range(2)]
    assert [(d.allowed, d.limit) for d in handshakes] == [(True, 1), (False, 1)]
    # Another user keeps the defaults; a value that is not a limit is ignored.
    assert (await limiter.check_prompt("dave")).limit == 3
    redis_server.cli("hset", "rl:{dave}:limits", "prompts", "lots")
    assert (await limiter.check_prompt("dave")).limit == 3
    redis_server.cli("hdel", "rl:{carol}:limits", "prompts")
    rejected = await limiter.check_prompt("carol")
    assert (rejected.allowed, rejected.limit) == (False, 3)


# Redis state: TTLs, writes, round trips.


@pytest_twisted.ensureDeferred
async def test_every_key_has_a_ttl_after_every_call_and_only_the_operator_hash_has_none(
    connect: Connect, redis_server: RedisServer
) -> None:
    limiter = connect(prompts=3, connections=2)
    redis_server.cli("hset", "rl:{erin}:limits", "prompts", "4")
    for n in range(24):
        user = ("alice", "bob", "erin")[n % 3]
        await (limiter.check_prompt(user) if n % 4 else limiter.check_handshake(user))
        assert lines(redis_server.cli("eval", NO_TTL, "0")) == ["rl:{erin}:limits"]
    keys = sorted(lines(redis_server.cli("keys", "*")))
    assert keys == [
        "rl:{alice}:connections",
        "rl:{alice}:prompts",
        "rl:{bob}:connections",
        "rl:{bob}:prompts",
        "rl:{erin}:connections",
        "rl:{erin}:limits",
        "rl:{erin}:prompts",
    ]
    # The TTL is the window after the newest hit, never more.
    assert 0 < integer(redis_server.cli("pttl", "rl:{alice}:prompts")) <= 60_000


def test_killing_a_client_mid_run_leaves_no_key_without_a_ttl(redis_server: RedisServer) -> None:
    process = client(redis_server, "hammer")
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "started"
    wait_until(lambda: integer(redis_server.cli("dbsize")) >= 500, timeout=20, what="500 keys")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    assert lines(redis_server.cli("eval", NO_TTL, "0")) == []
    assert integer(redis_server.cli("llen", "rl:{user0}:prompts")) <= 60


@pytest_twisted.ensureDeferred
async def test_a_flood_of_rejected_prompts_changes_nothing_in_redis(
    connect: Connect, redis_server: RedisServer
) -> None:
    limiter = connect(prompts=5, connections=2)
    for _ in range(5):
        await limiter.check_prompt("alice")
    for _ in range(2):
        await limiter.check_handshake("alice")
    before_log = redis_server.cli("lrange", "rl:{alice}:prompts", "0", "-1")
    before_ttl = integer(redis_server.cli("pttl", "rl:{alice}:prompts"))
    before_changes = info(redis_server, "persistence")["rdb_changes_since_last_save"]
    flood = [limiter.check_prompt("alice") for _ in range(500)]
    flood += [limiter.check_handshake("alice") for _ in range(100)]
    decisions: list[Decision] = await gatherResults(flood)
    assert not any(d.allowed for d in decisions)
    assert info(redis_server, "persistence")["rdb_changes_since_last_save"] == before_changes
    assert redis_server.cli("lrange", "rl:{alice}:prompts", "0", "-1") == before_log
    assert integer(redis_server.cli("pttl", "rl:{alice}:prompts")) <= before_ttl
    assert not limiter.degraded


@pytest_twisted.ensureDeferred
async def test_each_check_is_one_redis_command(connect: Connect, redis_server: RedisServer) -> None:
    limiter = connect(prompts=20, poolsize=1)
    await limiter.check_prompt("warmup")
    # The store's two pools (checks, replica confirmations) connect side by side: wait for
    # both SELECTs, so that a late one does not land in the count.
    await eventually(lambda: redis_server.command_calls().get("select") == 2, what="2 SELECTs")
    redis_server.cli("config", "resetstat")
    for n in range(40):
        await (limiter.check_prompt("alice") if n % 2 else limiter.check_handshake("bob"))
    calls = {name: n for name, n in redis_server.command_calls().items() if "config" not in name}
    # One EVALSHA per check; the rest ran inside it. No check here reached its limit, so
    # none read the oldest counted hit: the one LINDEX each is the clock-step guard.
    assert calls == {
        "evalsha": 40,
        "hget": 40,
        "time": 40,
        "llen": 40,
        "lindex": 40,
        "lpush": 40,
        "ltrim": 40,
        "pexpire": 40,
    }


@pytest_twisted.ensureDeferred
async def test_script_flush_is_not_an_outage(
    connect: Connect, redis_server: RedisServer, logs: Captured
) -> None:
    limiter = connect(prompts=5, poolsize=1)
    errors = redis_errors("ratelimit")
    for _ in range(2):
        assert (await limiter.check_prompt("alice")).allowed
    redis_server.cli("script", "flush")
    redis_server.cli("config", "resetstat")
    decisions = [await limiter.check_prompt("alice") for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert not limiter.degraded and logs.levels == []
    assert redis_errors("ratelimit") == errors
    # The first EVALSHA met NOSCRIPT and the pool sent the script again with EVAL.
    assert info(redis_server, "errorstats")["errorstat_NOSCRIPT"] == "count=1"
    calls = redis_server.command_calls()
    assert (calls["evalsha"], calls["eval"]) == (4, 1)
    assert integer(redis_server.cli("llen", "rl:{alice}:prompts")) == 5


# Outages.


async def timed(limiter: RateLimiter, count: int) -> tuple[list[Decision], float]:
    started = time.monotonic()
    decisions = await gatherResults([limiter.check_prompt("alice") for _ in range(count)])
    return decisions, time.monotonic() - started


@pytest.mark.parametrize("end", ["stop", "kill"])
@pytest_twisted.ensureDeferred
async def test_a_stopped_or_killed_redis_falls_back_within_the_timeout_and_comes_back(
    end: str, connect: Connect, redis_server: RedisServer, logs: Captured
) -> None:
    limiter = connect(prompts=5, timeout=0.1)
    errors = redis_errors("ratelimit")
    for _ in range(2):
        assert (await limiter.check_prompt("alice")).allowed
    getattr(redis_server, end)()

    decisions, elapsed = await timed(limiter, 10)
    assert elapsed < 0.1 + 0.15
    # The two prompts Redis accepted still count: three more, then the window is full.
    assert sum(d.allowed for d in decisions) == 3
    assert limiter.degraded
    assert sample("agentd_ratelimit_degraded") == 1
    assert redis_errors("ratelimit") >= errors + 10
    decisions, elapsed = await timed(limiter, 10)
    assert elapsed < 0.05 and not any(d.allowed for d in decisions)
    assert logs.levels == ["warn"]

    redis_server.start()
    await eventually(lambda: not limiter.degraded, timeout=20, what="recovery")
    assert logs.levels == ["warn", "info"]
    assert sample("agentd_ratelimit_degraded") == 0
    assert (await limiter.check_prompt("bob")).allowed
    assert integer(redis_server.cli("llen", "rl:{bob}:prompts")) == 1


@pytest_twisted.ensureDeferred
async def test_a_paused_redis_falls_back_within_the_timeout_and_limiting_returns_to_redis(
    connect: Connect, redis_server: RedisServer, logs: Captured
) -> None:
    limiter = connect(prompts=5, timeout=0.1)
    assert (await limiter.check_prompt("alice")).allowed
    redis_server.cli("client", "pause", "600", "ALL")

    decisions, elapsed = await timed(limiter, 10)
    assert elapsed < 0.1 + 0.15
    assert sum(d.allowed for d in decisions) == 4
    assert limiter.degraded and logs.levels == ["warn"]

    await eventually(lambda: not limiter.degraded, timeout=5, what="recovery")
    assert logs.levels == ["warn", "info"]
    assert (await limiter.check_prompt("bob")).allowed
    assert integer(redis_server.cli("llen", "rl:{bob}:prompts")) == 1


@pytest_twisted.ensureDeferred
async def test_redis_error_replies_fall_back_and_limiting_returns_when_they_stop(
    connect: Connect, redis_server: RedisServer, logs: Captured
) -> None:
    limiter = connect(prompts=5, timeout=0.1)
    assert (await limiter.check_prompt("alice")).allowed
    probes_failed = redis_errors("ratelimit_probe")
    redis_server.cli("config", "set", "maxmemory", "1")

    decisions, elapsed = await timed(limiter, 10)
    assert elapsed < 0.1 + 0.15
    assert sum(d.allowed for d in decisions) == 4
    assert limiter.degraded and logs.levels == ["warn"]
    # Probes keep failing while writes do.
    await eventually(
        lambda: redis_errors("ratelimit_probe") >= probes_failed + 3, what="three failed probes"
    )
    assert limiter.degraded and logs.levels == ["warn"]

    redis_server.cli("config", "set", "maxmemory", "0")
    await eventually(lambda: not limiter.degraded, timeout=5, what="recovery")
    assert logs.levels == ["warn", "info"]
    assert (await limiter.check_prompt("bob")).allowed
    assert integer(redis_server.cli("llen", "rl:{bob}:prompts")) == 1
