"""UsageRecorder against a real redis-server that the tests stop, kill and restart."""

from __future__ import annotations

import calendar
import datetime
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from agentd.config import UsageConfig
from agentd.pricing import PriceTable
from agentd.redisstore import RedisStore
from agentd.usage.layout import (
    day_expiry,
    month_expiry,
    month_of,
    month_total_expiry,
    project_month_total_key,
    user_month_total_key,
)
from agentd.usage.recorder import UsageRecorder
from agentd.usage.records import UsageEvent
from agentd.usage.reports import UsageReport
from tests.samples import sample
from tests.servers import RedisServer
from tests.waiting import eventually

REPO = Path(__file__).resolve().parent.parent
PRICES = PriceTable.load(REPO / "etc" / "prices.toml")


def event(query_id: str, timestamp: float, **changes: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "query_id": query_id,
        "user": "alice",
        "project": "p1",
        "agent": "echo",
        "model": "claude-sonnet-4-5",
        "input_tokens": 1000,
        "output_tokens": 100,
        "cache_read_tokens": 10,
        "cache_write_tokens": 1,
        "reported_cost": 0.001234,
        "timestamp": timestamp,
    }
    fields.update(changes)
    return UsageEvent(**fields)


class Recorders:
    """Recorders on their own Redis connections and spool directories, closed at the end."""

    def __init__(self, redis: RedisServer, tmp_path: Path) -> None:
        self.redis = redis
        self.tmp_path = tmp_path
        self.open: list[tuple[UsageRecorder, RedisStore]] = []

    def new(
        self, spool: str = "spool", timeout: float = 0.2, db: int = 0, **config: Any
    ) -> UsageRecorder:
        url = self.redis.url.rsplit("/", 1)[0] + f"/{db}"
        store = RedisStore(url, reactor, timeout=timeout)
        recorder = UsageRecorder.from_config(
            UsageConfig(spool_dir=str(self.tmp_path / spool), **config), store, reactor, PRICES
        )
        recorder.start()
        self.open.append((recorder, store))
        return recorder

    async def close(self) -> None:
        for recorder, store in self.open:
            await recorder.stop()
            await store.disconnect()


def counter(result: str) -> float:
    return sample("agentd_usage_events_total", result=result)


def soft_warnings() -> float:
    return sample("agentd_budget_soft_warnings_total", scope="user")


def claims_answered() -> float:
    """Soft-warning claims Redis has answered; the warning, if any, is counted by then."""
    return sample("agentd_redis_latency_seconds_count", operation="usage_soft_warning")


async def month_report(recorder: UsageRecorder, timestamp: float) -> UsageReport:
    return await recorder.report("user", "alice", month_of(timestamp))


@pytest_twisted.ensureDeferred
async def test_the_same_done_twice_and_a_resume_replay_are_recorded_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        await recorder.record(event("q1", now))
        await recorder.record(event("q1", now))
        await recorder.record(event("q1", now + 30, input_tokens=5))  # replayed after a resume
        await recorder.record(event("q2", now))
        totals = (await month_report(recorder, now)).totals
        assert (totals.queries, totals.input_tokens, totals.cost) == (2, 2000, 2468)
        record = json.loads(redis_server.cli("--raw", "GET", "{usage}:query:q1"))
        assert (record["input_tokens"], record["cost"], record["cost_source"]) == (
            1000,
            1234,
            "reported",
        )
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_recorders_on_separate_connections_count_exactly(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        first, second = recorders.new("a"), recorders.new("b")
        now = time.time()
        before = counter("recorded") + counter("replayed")
        events = [event(f"q{i}", now, input_tokens=i) for i in range(300)]
        await gatherResults(
            [first.record(e) for e in events] + [second.record(e) for e in reversed(events)]
        )
        # A burst this size may outlast the timeout: the late ones are replayed from the spool.
        await eventually(lambda: first.spool_depth == second.spool_depth == 0, timeout=20)
        totals = (await month_report(first, now)).totals
        assert totals.queries == 300
        assert totals.input_tokens == sum(range(300))
        assert counter("recorded") + counter("replayed") - before <= 300
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_every_key_expires_with_its_day_and_month(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new(retention_days=30)
        now = time.time()
        day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        for i, (user, project) in enumerate([("alice", "p1"), ("bob", "p2"), ("alice", "p2")]):
            await recorder.record(event(f"q{i}", now, user=user, project=project))
        keys = redis_server.cli("--raw", "KEYS", "*").split()
        assert len(keys) == 3 + 2 + 2 + 3 + 2 + 2  # records, users, projects, pairs, sets
        for key in keys:
            expires = int(redis_server.cli("--raw", "EXPIRETIME", key))
            if ":projects:" in key or ":users:" in key:
                assert expires == month_expiry(month_of(now), 30), key
            else:
                assert expires == day_expiry(day, 30), key
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_retention_keeps_the_last_days_and_refuses_older_events(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        kept, dropped = now - 89.5 * 86400, now - 91.5 * 86400
        await recorder.record(event("kept", kept))
        await recorder.record(event("dropped", dropped))
        assert (await month_report(recorder, kept)).totals.queries == 1
        assert (await month_report(recorder, dropped)).totals.queries == int(
            month_of(kept) == month_of(dropped)
        )
        ttl = int(redis_server.cli("--raw", "TTL", "{usage}:query:kept"))
        assert 0 < ttl <= 1.5 * 86400
        assert redis_server.cli("--raw", "EXISTS", "{usage}:query:dropped").strip() == "0"
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_months_split_at_midnight_utc(redis_server: RedisServer, tmp_path: Path) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        today = datetime.datetime.now(datetime.UTC).date()
        first_second = calendar.timegm(today.replace(day=1).timetuple())
        await recorder.record(event("before", first_second - 1))
        await recorder.record(event("after", first_second))
        this = await month_report(recorder, first_second)
        last = await month_report(recorder, first_second - 1)
        assert [d.day for d, _ in this.days] == [1]
        assert [d.day for d, _ in last.days] == [(today.replace(day=1) - datetime.timedelta(1)).day]
        assert this.totals.queries == last.totals.queries == 1
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_monthly_reads_use_no_keys_or_scan(redis_server: RedisServer, tmp_path: Path) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        await recorder.record(event("q1", now))
        redis_server.cli("CONFIG", "RESETSTAT")
        await month_report(recorder, now)
        await recorder.report("project", "p1", month_of(now))
        await recorder.check_budget("alice", "p1")
        stats = redis_server.cli("INFO", "commandstats")
        assert "cmdstat_hgetall" in stats
        assert "cmdstat_keys" not in stats and "cmdstat_scan" not in stats
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_budgets_and_overrides_set_with_redis_cli(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new(monthly_budget_usd=1.0)
        now = time.time()
        await recorder.record(event("a", now, reported_cost=0.4))
        assert (await recorder.check_budget("alice", "p1")).allowed
        redis_server.cli("HSET", "{usage}:budgets", "user:alice", "0.4")
        decision = await recorder.check_budget("alice", "p1")
        assert (decision.allowed, decision.scope, decision.budget_usd, decision.spent_usd) == (
            False,
            "user",
            0.4,
            0.4,
        )
        redis_server.cli("HDEL", "{usage}:budgets", "user:alice")
        redis_server.cli("HSET", "{usage}:budgets", "project:p1", "0.3")
        assert (await recorder.check_budget("bob", "p1")).scope == "project"
        await recorder.set_budget("project", "p1", None)
        assert (await recorder.check_budget("bob", "p1")).allowed
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_soft_threshold_is_logged_once_per_month_across_instances(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        first = recorders.new("a", monthly_budget_usd=1.0)
        second = recorders.new("b", monthly_budget_usd=1.0)
        await first.record(event("a", time.time(), reported_cost=0.85))
        warnings, claims = soft_warnings(), claims_answered()
        for recorder in (first, second, first):
            assert (await recorder.check_budget("alice", "p1")).allowed
        # One claim per instance (the first remembers its own); both answered, one won.
        await eventually(lambda: claims_answered() >= claims + 2, what="both claims answered")
        assert claims_answered() == claims + 2
        assert soft_warnings() == warnings + 1
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_redis_stopped_while_1000_queries_finish_loses_and_doubles_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        redis_server.cli("CONFIG", "SET", "save", "3600 1")  # keep what it has across restarts
        now = time.time()
        events = [event(f"q{i}", now, input_tokens=i, reported_cost=i / 1e4) for i in range(1000)]
        pending = []
        for start in range(0, 1000, 50):
            if start == 400:
                redis_server.stop()
            pending += [recorder.record(e) for e in events[start : start + 50]]
            # Queries finish over time, not all in one reactor turn: the stop lands among them.
            await deferLater(reactor, 0.005, lambda: None)
        await gatherResults(pending)
        depth = recorder.spool_depth
        assert depth >= 600
        assert recorder.health()["ok"] is False and recorder.health()["redis"] is False
        spool = tmp_path / "spool" / "usage-spool.jsonl"
        assert len(spool.read_bytes().splitlines()) == depth  # on disk before record() fired

        redis_server.start()
        await eventually(lambda: recorder.spool_depth == 0, timeout=20)
        totals = (await month_report(recorder, now)).totals
        assert totals.queries == 1000
        assert totals.input_tokens == sum(range(1000))
        assert totals.cost == sum(range(1000)) * 100
        assert spool.read_bytes() == b""
        assert recorder.health() == {
            "ok": True,
            "spool_depth": 0,
            "spool_writable": True,
            "redis": True,
        }
    finally:
        await recorders.close()


CHILD = """
import sys
from twisted.internet import defer, task
from agentd.config import UsageConfig
from agentd.pricing import PriceTable
from agentd.redisstore import RedisStore
from agentd.usage.recorder import UsageRecorder
from agentd.usage.records import UsageEvent

def main(reactor):
    url, spool, count, now = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    store = RedisStore(url, reactor, timeout=0.1)
    recorder = UsageRecorder.from_config(
        UsageConfig(spool_dir=spool), store, reactor, PriceTable.empty()
    )
    recorder.start()
    done = defer.gatherResults([
        recorder.record(UsageEvent(
            f"q{i}", "alice", "p1", "echo", "m", i, 1, 0, 0, 0.000001, now
        ))
        for i in range(count)
    ])
    done.addCallback(lambda _: print("spooled", recorder.spool_depth, flush=True))
    return done.addCallback(lambda _: defer.Deferred())

task.react(main)
"""


@pytest_twisted.ensureDeferred
async def test_kill_9_with_a_full_spool_then_restart_counts_exactly(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    now = time.time()
    redis_server.stop()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, redis_server.url, str(tmp_path / "spool"), "300", str(now)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"spooled 300\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    redis_server.start()
    recorders = Recorders(redis_server, tmp_path)
    try:
        # Some of these queries reach Redis another way first: they still count once.
        other = recorders.new("other")
        for i in range(100):
            await other.record(event(f"q{i}", now, model="m", input_tokens=i, output_tokens=1))
        successor = recorders.new()
        assert successor.spool_depth == 300
        await eventually(lambda: successor.spool_depth == 0, timeout=20)
        totals = (await month_report(successor, now)).totals
        assert totals.queries == 300
        assert totals.input_tokens == sum(range(300))
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_writes_in_flight(redis_server: RedisServer, tmp_path: Path) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        for i in range(200):
            recorder.record(event(f"q{i}", now))
        await recorder.stop()
        assert recorder.spool_depth == 0
        assert os.path.getsize(tmp_path / "spool" / "usage-spool.jsonl") == 0
        reader = recorders.new("reader")
        assert (await month_report(reader, now)).totals.queries == 200
    finally:
        await recorders.close()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd.cli", "usage", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest_twisted.ensureDeferred
async def test_agentd_usage_prints_the_report(redis_server: RedisServer, tmp_path: Path) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        await recorder.record(event("q1", now))
        await recorder.record(event("q2", now, project="p2"))
        redis_server.cli("HSET", "{usage}:budgets", "user:alice", "0.002")
        month = month_of(now)
        env = {"AGENTD_REDIS_URL": redis_server.url}
        out = run_cli("--user", "alice", "--month", month, env=env)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report == (await recorder.report("user", "alice", month)).as_json()
        assert report["totals"]["queries"] == 2
        assert report["budget"] == {
            "monthly_usd": 0.002,
            "spent_usd": 0.002468,
            "soft_ratio": 0.8,
            "soft_warning": True,
            "reached": True,
        }
        csv = run_cli("--project", "p2", "--month", month, "--format", "csv", env=env)
        assert csv.stdout.splitlines()[1].startswith(f"total,{month},,0.001234,")
        bad = run_cli("--user", "alice", "--month", "2026-13", env=env)
        assert bad.returncode == 2 and "YYYY-MM" in bad.stderr
        no_redis = run_cli("--user", "alice", env={"AGENTD_REDIS_URL": ""})
        assert no_redis.returncode == 2 and "[redis] url" in no_redis.stderr
    finally:
        await recorders.close()


async def month_totals_match_days(
    redis_server: RedisServer, recorder: UsageRecorder, timestamp: float
) -> None:
    """The stored month-to-date totals (read directly, not through a budget check) equal the
    operator-paid sums of the day keys, for the user and for the project."""
    month = month_of(timestamp)
    for scope, subject, key in (
        ("user", "alice", user_month_total_key("alice", month)),
        ("project", "p1", project_month_total_key("p1", month)),
    ):
        days = (await recorder.report(scope, subject, month)).totals.operator_cost
        assert days > 0
        assert redis_server.cli("--raw", "GET", key).strip() == str(days), scope


@pytest_twisted.ensureDeferred
async def test_month_total_equals_the_day_totals_after_concurrent_recording(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        first, second, third = recorders.new("a"), recorders.new("b"), recorders.new("c")
        now = time.time()
        await first.record(event("early", now, reported_cost=0.5))
        assert (await first.check_budget("alice", "p1")).spent_usd == 0.5  # built from days
        events = [event(f"q{i}", now, reported_cost=i / 1e4) for i in range(200)]
        own_key = [event(f"own{i}", now, key_source="user") for i in range(20)]
        await gatherResults(
            [first.record(e) for e in events + own_key]
            + [second.record(e) for e in reversed(events)]
            + [third.record(e) for e in events[::2]]
        )
        await eventually(
            lambda: all(r.spool_depth == 0 for r in (first, second, third)), timeout=20
        )
        await month_totals_match_days(redis_server, first, now)
        expected = 500_000 + sum(range(200)) * 100
        assert (await second.check_budget("alice", "p1")).spent_usd == expected / 1e6
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_a_record_the_operator_did_not_pay_for_leaves_the_month_totals_alone(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        await recorder.record(event("nopay-paid", now, reported_cost=0.25))
        await recorder.check_budget("alice", "p1")  # the month totals exist from here on
        before = redis_server.command_calls()
        await recorder.record(event("nopay-own-key", now, key_source="user"))
        await recorder.record(event("nopay-free", now, reported_cost=0.0))
        calls = redis_server.command_calls()
        assert calls["hincrby"] > before["hincrby"]  # both recorded, as their day hashes show
        assert calls.get("incrby", 0) == before.get("incrby", 0)
        await month_totals_match_days(redis_server, recorder, now)
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_month_total_equals_the_day_totals_after_a_spool_replay(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        redis_server.cli("CONFIG", "SET", "save", "3600 1")  # keep what it has across restarts
        now = time.time()
        await recorder.record(event("before", now))
        await recorder.check_budget("alice", "p1")
        redis_server.stop()
        await gatherResults([recorder.record(event(f"q{i}", now)) for i in range(50)])
        assert recorder.spool_depth == 50
        redis_server.start()
        await eventually(lambda: recorder.spool_depth == 0, timeout=20)
        await month_totals_match_days(redis_server, recorder, now)
        assert (await month_report(recorder, now)).totals.operator_cost == 51 * 1234
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_a_deleted_month_total_is_rebuilt_by_the_next_budget_check_and_kept_exact(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        month = month_of(now)
        for i in range(5):
            await recorder.record(event(f"q{i}", now))
        await recorder.check_budget("alice", "p1")
        key = user_month_total_key("alice", month)
        redis_server.cli("DEL", key, project_month_total_key("p1", month))
        await recorder.record(event("while-missing", now))
        assert redis_server.cli("--raw", "EXISTS", key).strip() == "0"  # not started from 0
        assert (await recorder.check_budget("alice", "p1")).spent_usd == 0.007404
        expires = int(redis_server.cli("--raw", "EXPIRETIME", key))
        assert expires == month_total_expiry(month)
        for i in range(5):
            await recorder.record(event(f"after{i}", now))
        await month_totals_match_days(redis_server, recorder, now)
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_a_budget_check_reads_the_month_totals_in_one_script_and_no_day_keys(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new(monthly_budget_usd=1.0)
        now = time.time()
        await recorder.record(event("q1", now))
        await recorder.check_budget("alice", "p1")  # builds the totals
        redis_server.cli("CONFIG", "RESETSTAT")
        decision = await recorder.check_budget("alice", "p1")
        assert decision.spent_usd == 0.001234
        # One round trip: one script (EVAL until this connection has sent it once), reading
        # the two totals and the overrides hash.
        calls = redis_server.command_calls()
        assert calls.pop("eval", 0) + calls.pop("evalsha", 0) == 1
        # A pool connection still being set up on a loaded machine says SELECT once: not part
        # of the check.
        calls.pop("select", None)
        assert calls == {"get": 2, "hmget": 1}
    finally:
        await recorders.close()


@pytest_twisted.ensureDeferred
async def test_records_waiting_together_are_applied_in_one_script_call_each_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    recorders = Recorders(redis_server, tmp_path)
    try:
        recorder = recorders.new()
        now = time.time()
        await recorder.record(event("early", now, reported_cost=0.5))
        await recorder.check_budget("alice", "p1")  # builds the month totals
        redis_server.cli("CONFIG", "RESETSTAT")
        recorded = counter("recorded")
        duplicates = counter("duplicate")
        # A chunk's worth of queries end in the same window; one of them is delivered twice,
        # and one was recorded before.
        events = [event(f"q{i}", now, reported_cost=i / 1e4) for i in range(6)]
        events += [event("q3", now), event("early", now)]
        await gatherResults([recorder.record(e) for e in events])
        calls = redis_server.command_calls()
        assert calls.pop("eval", 0) + calls.pop("evalsha", 0) == 1
        assert calls["set"] == 6  # a marker per query recorded, none for the duplicates
        assert (counter("recorded"), counter("duplicate")) == (recorded + 6, duplicates + 2)
        totals = (await month_report(recorder, now)).totals
        assert (totals.queries, totals.cost) == (7, 500_000 + sum(range(6)) * 100)
        await month_totals_match_days(redis_server, recorder, now)
    finally:
        await recorders.close()


def database(server: RedisServer, db: int) -> dict[str, tuple[Any, int]]:
    """Every key of database ``db``: its value and when it expires (EXPIRETIME)."""
    cli = functools.partial(server.cli, "-n", str(db), "--raw")
    keys = {}
    for key in cli("KEYS", "*").split():
        kind = cli("TYPE", key).strip()
        if kind == "hash":
            fields = cli("HGETALL", key).split()
            value: Any = dict(zip(fields[::2], fields[1::2], strict=True))
        elif kind == "set":
            value = sorted(cli("SMEMBERS", key).split())
        else:
            value = cli("GET", key).strip()
        keys[key] = (value, int(cli("EXPIRETIME", key)))
    return keys


@pytest_twisted.ensureDeferred
async def test_records_applied_together_leave_every_key_as_each_applied_alone(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The chunk's script sums its records' increments per key before writing them."""
    recorders = Recorders(redis_server, tmp_path)
    try:
        together = recorders.new("together", db=0)
        alone = recorders.new("alone", db=1)
        now = time.time()
        events = [
            event("a1", now),
            event("a2", now, user="bob"),
            event("a3", now, project="p2", reported_cost=0.25),
            event("a4", now - 86_400, reported_cost=0.5),  # another day, perhaps another month
            event("a5", now, key_source="user"),  # not paid by the operator
            event("a6", now, reported_cost=0.0, input_tokens=0, cache_write_tokens=0),
            event("a1", now),  # the same query again: a duplicate
            event("a7", now, user="bob", project="p2"),
        ]
        for recorder in (together, alone):
            for user, project in (("alice", "p1"), ("bob", "p2")):
                await recorder.check_budget(user, project)  # the month totals exist
        redis_server.cli("CONFIG", "RESETSTAT")
        recorded, duplicates = counter("recorded"), counter("duplicate")
        await gatherResults([together.record(e) for e in events])
        chunk = redis_server.command_calls()
        assert chunk.pop("eval", 0) + chunk.pop("evalsha", 0) == 1
        assert (counter("recorded"), counter("duplicate")) == (recorded + 7, duplicates + 1)

        redis_server.cli("CONFIG", "RESETSTAT")
        for e in events:
            await alone.record(e)
        each = redis_server.command_calls()
        assert each.pop("eval", 0) + each.pop("evalsha", 0) == 8

        assert database(redis_server, 0) == database(redis_server, 1)
        # alice's and bob's records share their day hashes, sets and month totals.
        assert chunk["hincrby"] < each["hincrby"] and chunk["expireat"] < each["expireat"]
        assert chunk["sadd"] < each["sadd"] and chunk["incrby"] < each["incrby"]
        assert chunk["set"] == each["set"] == 7
        await month_totals_match_days(redis_server, together, now)
    finally:
        await recorders.close()
