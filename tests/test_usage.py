"""UsageRecorder without Redis: validation, pricing, exactly-once, totals, budgets, the spool."""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from agentd.config import ConfigError, UsageConfig, from_dict
from agentd.pricing import PriceTable
from agentd.usage.budgets import BudgetDecision
from agentd.usage.layout import (
    COUNTER_FIELDS,
    day_expiry,
    month_days,
    month_expiry,
    month_of,
    month_total_expiry,
    parse_month,
    project_month_total_key,
    user_day_key,
    user_month_total_key,
    utc_day,
)
from agentd.usage.memory_store import MemoryUsageStore
from agentd.usage.recorder import FLUSH_CHUNK, UsageRecorder
from agentd.usage.records import UsageEvent, UsageRecord
from agentd.usage.reports import UsageReport
from agentd.usage.spool import Spool, SpoolLockedError, default_spool_dir
from agentd.usage.store import MonthSpend
from tests.samples import sample

T = TypeVar("T")

PRICES = PriceTable.from_dict(
    {
        "models": {
            "m": [
                {
                    "effective": datetime.date(2026, 1, 1),
                    "input": 3.0,
                    "output": 15.0,
                    "cache_read": 0.30,
                    "cache_write": 3.75,
                },
                {
                    "effective": datetime.date(2026, 11, 15),
                    "input": 1.0,
                    "output": 5.0,
                    "cache_read": 0.10,
                    "cache_write": 1.25,
                },
            ]
        }
    }
)
# How long a usage record waits for others to share its call to the store.
WINDOW = UsageConfig().batch_ms / 1000
NOW = calendar.timegm(datetime.datetime(2026, 11, 20, 12, 0, 0).timetuple())


def result_of(d: Deferred[T]) -> T:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def event(query_id: str = "q1", **changes: Any) -> UsageEvent:
    fields: dict[str, Any] = {
        "query_id": query_id,
        "user": "alice",
        "project": "p1",
        "agent": "echo",
        "model": "m",
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "reported_cost": 0.01,
        "timestamp": NOW,
    }
    fields.update(changes)
    return UsageEvent(**fields)


class Now:
    def __init__(self, value: float = NOW) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


class Meter:
    """A recorder on the in-memory store, with the clock its work waits for."""

    def __init__(
        self, now: Now | None = None, budget: float = 0.0, retention_days: int = 90
    ) -> None:
        self.clock = Clock()
        self.recorder = UsageRecorder.from_config(
            UsageConfig(monthly_budget_usd=budget, retention_days=retention_days),
            None,
            self.clock,
            PRICES,
            now=now or Now(),
        )

    def record(self, *events: UsageEvent) -> None:
        recorded = [self.recorder.record(e) for e in events]
        self.clock.advance(WINDOW)
        for d in recorded:
            assert result_of(d) is None


def report(recorder: UsageRecorder, scope: str = "user", subject: str = "alice") -> UsageReport:
    return result_of(recorder.report(scope, subject, "2026-11"))


# --- The agent's usage object -------------------------------------------------------------


def test_from_agent_usage_reads_every_field() -> None:
    e = UsageEvent.from_agent_usage(
        {
            "inputTokens": 10,
            "outputTokens": 20,
            "cacheReadTokens": 30,
            "cacheWriteTokens": 40,
            "cost": 0.5,
            "model": "claude-sonnet-4-5",
        },
        query_id="q",
        user="u",
        project="p",
        agent="claude",
        timestamp=NOW,
        key_source="user",
        outcome="aborted",
    )
    assert e == UsageEvent(
        "q", "u", "p", "claude", "claude-sonnet-4-5", 10, 20, 30, 40, 0.5, NOW, "user", "aborted"
    )


def test_from_agent_usage_defaults_absent_tokens_cost_and_model() -> None:
    e = UsageEvent.from_agent_usage(
        {"inputTokens": 10, "outputTokens": 2.0, "cacheReadTokens": None},
        query_id="q",
        user="u",
        project="p",
        agent="echo",
        timestamp=NOW,
    )
    assert e is not None
    assert (e.input_tokens, e.output_tokens, e.cache_read_tokens, e.cache_write_tokens) == (
        10,
        2,
        0,
        0,
    )
    assert e.reported_cost is None
    assert e.model == "echo"


@pytest.mark.parametrize(
    "usage",
    [
        None,
        [],
        "10 tokens",
        {},
        {"model": "m"},
        {"inputTokens": -1},
        {"inputTokens": 1.5},
        {"inputTokens": True},
        {"inputTokens": "10"},
        {"inputTokens": 10**12},
        {"inputTokens": 1, "cost": -0.01},
        {"inputTokens": 1, "cost": float("nan")},
        {"inputTokens": 1, "cost": float("inf")},
        {"inputTokens": 1, "cost": "0.01"},
        {"inputTokens": 1, "cost": 10**9},
        {"inputTokens": 1, "model": ""},
        {"inputTokens": 1, "model": "has space"},
        {"inputTokens": 1, "model": 42},
    ],
)
def test_from_agent_usage_refuses_malformed_usage(usage: Any) -> None:
    assert (
        UsageEvent.from_agent_usage(
            usage, query_id="q", user="u", project="p", agent="echo", timestamp=NOW
        )
        is None
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"user": "bob:admin"},
        {"project": "../p"},
        {"query_id": ""},
        {"query_id": "has space"},
        {"timestamp": float("nan")},
        {"timestamp": -1},
        {"input_tokens": -5},
        {"reported_cost": -1.0},
        {"key_source": "nobody"},
        {"outcome": "maybe"},
    ],
)
def test_invalid_events_are_refused_and_counted_as_failed(changes: dict[str, Any]) -> None:
    meter = Meter()
    recorder = meter.recorder
    before = sample("agentd_usage_events_total", result="failed")
    meter.record(event(**changes))
    assert sample("agentd_usage_events_total", result="failed") == before + 1
    assert report(recorder).totals.queries == 0


# --- Pricing ------------------------------------------------------------------------------


def test_a_record_lists_its_fields_and_counters_in_the_order_stores_read_them() -> None:
    record = UsageRecord.from_event(event(key_source="user"), PRICES)
    # The Redis script takes the counters' increments in COUNTER_FIELDS's order, by position.
    assert tuple(record.counters()) == COUNTER_FIELDS
    line = record.to_line()
    # Every field it is made from; its day and month follow from the timestamp.
    made_from = [f.name for f in dataclasses.fields(UsageRecord) if f.init]
    assert list(json.loads(line)) == ["v", *made_from]
    assert "day" not in made_from and "month" not in made_from
    again = UsageRecord.from_line(line)
    assert again == record and (again.day, again.month) == (record.day, record.month)
    assert record.month == record.day.strftime("%Y-%m")


def test_reported_cost_is_used_when_present() -> None:
    record = UsageRecord.from_event(event(reported_cost=0.123456789), PRICES)
    assert (record.cost, record.cost_source) == (123457, "reported")


def test_missing_cost_is_priced_with_the_entry_in_force_on_the_query_day() -> None:
    before = UsageRecord.from_event(event(reported_cost=None, timestamp=NOW - 10 * 86400), PRICES)
    after = UsageRecord.from_event(event(reported_cost=None), PRICES)
    # 1000 input + 200 output tokens at 3/15 USD per million, then at 1/5 from 2026-11-15.
    assert (before.cost, before.cost_source) == (3000 + 3000, "priced")
    assert (after.cost, after.cost_source) == (1000 + 1000, "priced")


def test_cache_tokens_are_priced_once_at_their_own_rate_and_not_added_to_input() -> None:
    meter = Meter()
    recorder = meter.recorder
    meter.record(
        event(
            reported_cost=None,
            input_tokens=1000,
            output_tokens=100,
            cache_read_tokens=50_000,
            cache_write_tokens=4_000,
        )
    )
    totals = report(recorder).totals
    # 1000 x 1.00 + 100 x 5.00 + 50000 x 0.10 + 4000 x 1.25 micro-dollars
    assert totals.cost == 1000 + 500 + 5000 + 5000
    assert (totals.input_tokens, totals.cache_read_tokens, totals.cache_write_tokens) == (
        1000,
        50_000,
        4_000,
    )
    assert totals.queries_priced == 1


def test_a_model_without_price_or_cost_is_recorded_unpriced_at_zero() -> None:
    meter = Meter()
    recorder = meter.recorder
    meter.record(event(reported_cost=None, model="mystery"))
    totals = report(recorder).totals
    assert (totals.queries, totals.cost, totals.queries_unpriced, totals.input_tokens) == (
        1,
        0,
        1,
        1000,
    )


# --- Exactly once and totals --------------------------------------------------------------


def test_the_same_query_twice_is_counted_once() -> None:
    meter = Meter()
    recorder = meter.recorder
    before = sample("agentd_usage_events_total", result="duplicate")
    meter.record(event("q1"))
    # A resumed session may deliver the done again, later and with another timestamp.
    meter.record(event("q1", timestamp=NOW + 3600))
    totals = report(recorder).totals
    assert (totals.queries, totals.cost, totals.input_tokens) == (1, 10_000, 1000)
    assert sample("agentd_usage_events_total", result="duplicate") == before + 2 - 1


def test_daily_totals_per_user_per_project_and_per_user_in_project() -> None:
    meter = Meter()
    recorder = meter.recorder
    for i, (user, project) in enumerate(
        [("alice", "p1"), ("alice", "p1"), ("alice", "p2"), ("bob", "p1")]
    ):
        meter.record(event(f"q{i}", user=user, project=project))
    alice = report(recorder)
    assert alice.totals.queries == 3
    assert [(name, t.queries) for name, t in alice.breakdown] == [("p1", 2), ("p2", 1)]
    p1 = report(recorder, "project", "p1")
    assert p1.totals.queries == 3
    assert [(name, t.queries) for name, t in p1.breakdown] == [("alice", 2), ("bob", 1)]
    assert [day.isoformat() for day, _ in p1.days] == ["2026-11-20"]


def test_aborted_and_failed_queries_are_recorded_with_their_outcome() -> None:
    meter = Meter()
    recorder = meter.recorder
    meter.record(event("a", outcome="aborted"))
    meter.record(event("e", outcome="error"))
    assert report(recorder).totals.queries == 2


def test_days_and_months_are_utc() -> None:
    meter = Meter()
    recorder = meter.recorder
    last_second = calendar.timegm(datetime.datetime(2026, 10, 31, 23, 59, 59).timetuple())
    meter.record(event("oct", timestamp=last_second))
    meter.record(event("nov", timestamp=last_second + 1))
    october = result_of(recorder.report("user", "alice", "2026-10"))
    november = report(recorder)
    assert [d.isoformat() for d, _ in october.days] == ["2026-10-31"]
    assert [d.isoformat() for d, _ in november.days] == ["2026-11-01"]
    assert october.totals.queries == november.totals.queries == 1


def test_day_keys_are_kept_for_the_retention_days_and_not_longer() -> None:
    now = Now()
    meter = Meter(now, retention_days=3)
    recorder = meter.recorder
    meter.record(event("q1"))
    day_end = calendar.timegm(datetime.date(2026, 11, 21).timetuple())
    now.value = day_end + 3 * 86400 - 1
    assert report(recorder).totals.queries == 1
    now.value = day_end + 3 * 86400
    assert report(recorder).totals.queries == 0


def test_events_older_than_retention_are_not_recorded() -> None:
    meter = Meter(retention_days=3)
    recorder = meter.recorder
    before = sample("agentd_usage_events_total", result="failed")
    meter.record(event("old", timestamp=NOW - 5 * 86400))
    meter.record(event("recent", timestamp=NOW - 2 * 86400))
    assert report(recorder).totals.queries == 1
    assert sample("agentd_usage_events_total", result="failed") == before + 1


def test_tokens_and_cost_metrics_count_recorded_events_once() -> None:
    meter = Meter()
    tokens = sample("agentd_tokens_total", agent="echo", type="cache_read")
    cost = sample("agentd_cost_usd_total", agent="echo")
    meter.record(event("m1", cache_read_tokens=7, reported_cost=0.25))
    meter.record(event("m1", cache_read_tokens=7, reported_cost=0.25))
    assert sample("agentd_tokens_total", agent="echo", type="cache_read") == tokens + 7
    assert sample("agentd_cost_usd_total", agent="echo") == pytest.approx(cost + 0.25)


# --- Budgets ------------------------------------------------------------------------------


def spend(meter: Meter, usd: float, query_id: str, **changes: Any) -> None:
    meter.record(event(query_id, reported_cost=usd, **changes))


def test_budget_blocks_at_the_limit_and_not_before() -> None:
    meter = Meter(budget=10.0)
    recorder = meter.recorder
    spend(meter, 9.999999, "a")
    decision = result_of(recorder.check_budget("alice", "p1"))
    assert decision == BudgetDecision(True, None, 10.0, 9.999999)
    spend(meter, 0.000001, "b")
    assert result_of(recorder.check_budget("alice", "p1")) == BudgetDecision(
        False, "user", 10.0, 10.0
    )
    # Another user of the same project is not affected by alice's budget.
    assert result_of(recorder.check_budget("bob", "p1")).allowed


def test_last_months_spend_does_not_count() -> None:
    now = Now()
    meter = Meter(now, budget=10.0)
    recorder = meter.recorder
    spend(meter, 10.0, "a")
    assert not result_of(recorder.check_budget("alice", "p1")).allowed
    now.value = calendar.timegm(datetime.date(2026, 12, 1).timetuple())
    assert result_of(recorder.check_budget("alice", "p1")).allowed


def test_runtime_overrides_for_users_and_projects() -> None:
    meter = Meter(budget=10.0)
    recorder = meter.recorder
    spend(meter, 4.0, "a")
    spend(meter, 2.0, "b", user="bob")
    result_of(recorder.set_budget("user", "alice", 4.0))
    assert result_of(recorder.check_budget("alice", "p1")) == BudgetDecision(
        False, "user", 4.0, 4.0
    )
    result_of(recorder.set_budget("user", "alice", 0))  # 0: no budget at all
    assert result_of(recorder.check_budget("alice", "p1")).allowed
    result_of(recorder.set_budget("project", "p1", 6.0))
    assert result_of(recorder.check_budget("alice", "p1")) == BudgetDecision(
        False, "project", 6.0, 6.0
    )
    assert result_of(recorder.check_budget("bob", "p1")).scope == "project"
    assert result_of(recorder.check_budget("alice", "p2")).allowed
    result_of(recorder.set_budget("project", "p1", None))
    result_of(recorder.set_budget("user", "alice", None))  # back to the default of 10
    assert result_of(recorder.check_budget("alice", "p1")).budget_usd == 10.0
    with pytest.raises(ValueError):
        recorder.set_budget("team", "x", 1.0)
    with pytest.raises(ValueError):
        recorder.set_budget("user", "alice", -1.0)


def test_spend_paid_with_the_users_own_key_is_not_counted_against_budgets() -> None:
    meter = Meter(budget=1.0)
    recorder = meter.recorder
    spend(meter, 5.0, "own", key_source="user")
    decision = result_of(recorder.check_budget("alice", "p1"))
    assert (decision.allowed, decision.spent_usd) == (True, 0.0)
    totals = report(recorder).totals
    assert (totals.cost, totals.cost_user_key) == (5_000_000, 5_000_000)


def test_soft_threshold_warns_once_per_month_and_scope() -> None:
    now = Now()
    meter = Meter(now, budget=10.0)
    recorder = meter.recorder
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        before = sample("agentd_budget_soft_warnings_total", scope="user")
        spend(meter, 7.99, "a")
        result_of(recorder.check_budget("alice", "p1"))
        assert sample("agentd_budget_soft_warnings_total", scope="user") == before
        spend(meter, 0.01, "b")
        for _ in range(3):
            result_of(recorder.check_budget("alice", "p1"))
        assert sample("agentd_budget_soft_warnings_total", scope="user") == before + 1
        now.value = calendar.timegm(datetime.date(2026, 12, 2).timetuple())
        spend(meter, 8.0, "c", timestamp=now.value)
        result_of(recorder.check_budget("alice", "p1"))
        assert sample("agentd_budget_soft_warnings_total", scope="user") == before + 2
    finally:
        globalLogPublisher.removeObserver(logged.append)
    warnings = [e for e in logged if "budget for" in e.get("log_format", "")]
    assert [(e["subject"], e["month"]) for e in warnings] == [
        ("alice", "2026-11"),
        ("alice", "2026-12"),
    ]


class BrokenStore(MemoryUsageStore):
    """A store whose every call fails, as Redis does while it is down."""

    def __init__(self) -> None:
        super().__init__(Now())
        self.down = True
        self.attempts = 0
        self.spend_attempts = 0

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        self.attempts += 1
        if self.down:
            return fail(ConnectionError("down"))
        return super().apply(record, expire_at, month_expire_at)

    def spend(self, user: str, project: str, days: Sequence[datetime.date]) -> Deferred[MonthSpend]:
        self.spend_attempts += 1
        if self.down:
            return fail(TimeoutError())
        return super().spend(user, project, days)


def test_budget_check_allows_when_the_store_cannot_answer(tmp_path: Path) -> None:
    store, clock = BrokenStore(), Clock()
    recorder = UsageRecorder(
        store, clock, PRICES, monthly_budget_usd=1.0, spool=Spool(tmp_path), now=Now()
    )
    allowed = BudgetDecision(True, None, None, 0.0)
    assert result_of(recorder.check_budget("alice", "p1")) == allowed
    # While the store is known to fail, prompts do not wait for its timeout: it is probed
    # now and then.
    for _ in range(3):
        assert result_of(recorder.check_budget("alice", "p1")) == allowed
    assert store.spend_attempts == 1
    clock.advance(0.5)
    store.down = False
    assert result_of(recorder.check_budget("alice", "p1")).budget_usd == 1.0
    assert store.spend_attempts == 2


def test_memory_store_keeps_month_totals_like_redis() -> None:
    store = MemoryUsageStore(Now())
    days = month_days("2026-11")
    totals = [user_month_total_key("alice", "2026-11"), project_month_total_key("p1", "2026-11")]

    def apply(query_id: str, **changes: Any) -> str:
        record = UsageRecord.from_event(event(query_id, **changes), PRICES)
        return result_of(
            store.apply(record, day_expiry(record.day, 90), month_expiry("2026-11", 90))
        )

    def stored() -> list[bytes | None]:
        return [store._values.get(key) for key in totals]

    apply("a", reported_cost=1.0)
    apply("b", reported_cost=2.0, timestamp=NOW - 86400)
    assert stored() == [None, None]  # an increment alone would miss the earlier days
    assert result_of(store.spend("alice", "p1", days)) == MonthSpend(
        3_000_000, 3_000_000, None, None
    )
    assert stored() == [b"3000000", b"3000000"]
    assert store._expiry[totals[0]] == month_total_expiry("2026-11")

    apply("c", reported_cost=0.5)
    apply("c", reported_cost=0.5)  # a duplicate moves nothing
    apply("own", reported_cost=7.0, key_source="user")  # not operator-paid
    apply("other", reported_cost=9.0, user="bob", project="p2")
    assert stored() == [b"3500000", b"3500000"]

    del store._values[totals[0]]  # deleted: rebuilt by the next check
    apply("d", reported_cost=0.25)
    assert stored() == [None, b"3750000"]
    assert result_of(store.spend("alice", "p1", days)).user == 3_750_000
    assert stored() == [b"3750000", b"3750000"]


def test_unreadable_budget_override_falls_back_to_the_default() -> None:
    store = MemoryUsageStore(Now())
    result_of(store.set_budget("user:alice", "lots"))
    recorder = UsageRecorder(store, Clock(), PRICES, monthly_budget_usd=3.0, now=Now())
    assert result_of(recorder.check_budget("alice", "p1")).budget_usd == 3.0


# --- Reports ------------------------------------------------------------------------------


def test_report_as_json_and_csv() -> None:
    meter = Meter()
    recorder = meter.recorder
    spend(meter, 1.5, "a", input_tokens=10, output_tokens=20)
    spend(meter, 0.25, "b", project="p2", input_tokens=1, output_tokens=2, key_source="user")
    r = report(recorder)
    data = r.as_json()
    assert data["user"] == "alice" and data["month"] == "2026-11"
    assert data["totals"]["cost_usd"] == 1.75
    assert data["totals"]["cost_micro_usd"] == 1_750_000
    assert data["totals"]["user_key_cost_usd"] == 0.25
    assert [p["project"] for p in data["projects"]] == ["p1", "p2"]
    assert data["days"] == [{"date": "2026-11-20", **r.totals.as_dict()}]
    rows = r.as_csv().split("\r\n")
    assert rows[0].startswith("row,date,project,cost_usd,user_key_cost_usd,input_tokens")
    assert rows[1] == "total,2026-11,,1.750000,0.250000,11,22,0,0,2,0,0"
    assert rows[2] == "day,2026-11-20,,1.750000,0.250000,11,22,0,0,2,0,0"
    assert rows[3] == "project,,p1,1.500000,0.000000,10,20,0,0,1,0,0"
    assert rows[4] == "project,,p2,0.250000,0.250000,1,2,0,0,1,0,0"
    assert rows[5] == ""
    json.dumps(data)


def test_utc_days_and_months_agree_with_the_calendar_at_every_edge() -> None:
    midnights = [
        calendar.timegm(datetime.date(year, month, 1).timetuple())
        for year in (1970, 2024, 2026, 2100, 9999)
        for month in (1, 2, 3, 12)
    ]
    for midnight in midnights:
        for timestamp in (midnight, midnight + 0.5, midnight - 0.000_001, midnight - 1):
            if timestamp <= 0:
                continue
            expected = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
            assert utc_day(timestamp) == expected.date(), timestamp
            assert month_of(timestamp) == expected.strftime("%Y-%m"), timestamp


def test_month_helpers() -> None:
    assert parse_month("2026-02") == "2026-02"
    for bad in ("2026-13", "2026-1", "1969-12", "26-01", "2026-02-01", ""):
        with pytest.raises(ValueError):
            parse_month(bad)
    assert len(month_days("2028-02")) == 29
    assert user_day_key("a", datetime.date(2026, 1, 2)) == "{usage}:day:user:a:2026-01-02"


# --- The spool ----------------------------------------------------------------------------


def record_of(query_id: str) -> UsageRecord:
    return UsageRecord.from_event(event(query_id), PRICES)


def test_spool_survives_a_new_process_and_is_truncated_once_applied(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.open() == 0
    result_of(spool.append(record_of("a")))
    result_of(spool.append(record_of("b")))
    assert len(spool.path.read_bytes().splitlines()) == 2
    result_of(spool.close())

    again = Spool(tmp_path)
    assert again.open() == 2
    assert [r.query_id for r in again.pending(10)] == ["a", "b"]
    again.acknowledge(1)
    assert len(again.path.read_bytes().splitlines()) == 2  # kept until all are applied
    again.acknowledge(1)
    assert again.path.read_bytes() == b""
    result_of(again.close())


def test_spool_skips_a_torn_last_line_and_unreadable_lines(tmp_path: Path) -> None:
    good = record_of("good").to_line()
    (tmp_path / "usage-spool.jsonl").write_bytes(b"garbage\n" + good + good[:20])
    spool = Spool(tmp_path)
    assert spool.open() == 1
    result_of(spool.append(record_of("next")))
    result_of(spool.close())
    again = Spool(tmp_path)
    # The torn fragment ends up on a line of its own, the new record stays readable.
    assert [r.query_id for r in (again.pending(10) if again.open() else [])] == ["good", "next"]
    result_of(again.close())


def test_a_spool_directory_is_used_by_one_process_at_a_time(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    first.open()
    with pytest.raises(SpoolLockedError):
        Spool(tmp_path).open()
    second_recorder = UsageRecorder(BrokenStore(), Clock(), PRICES, spool=Spool(tmp_path))
    with pytest.raises(ConfigError, match=r"\[usage\] spool_dir: .*another agentd process"):
        second_recorder.start()
    result_of(first.close())
    second = Spool(tmp_path)
    second.open()
    result_of(second.close())


def test_spool_file_is_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "state")
    spool.open()
    assert (spool.path.stat().st_mode & 0o777) == 0o600
    result_of(spool.close())


def test_default_spool_dir() -> None:
    cwd = Path("/srv")
    assert default_spool_dir({"STATE_DIRECTORY": "/var/lib/agentd:/x"}, cwd) == Path(
        "/var/lib/agentd"
    )
    assert default_spool_dir({"XDG_STATE_HOME": "/home/a/.local/state"}, cwd) == Path(
        "/home/a/.local/state/agentd"
    )
    assert default_spool_dir({}, cwd) == Path("/srv/var/agentd")


def spooling_recorder(tmp_path: Path, store: MemoryUsageStore, clock: Clock) -> UsageRecorder:
    return UsageRecorder(store, clock, PRICES, spool=Spool(tmp_path), now=Now(), retention_days=90)


def test_failed_writes_are_spooled_and_replayed_in_order_when_the_store_is_back(
    tmp_path: Path,
) -> None:
    store, clock = BrokenStore(), Clock()
    recorder = spooling_recorder(tmp_path, store, clock)
    recorder.start()
    recorded = [recorder.record(event(f"q{i}")) for i in range(5)]
    assert recorder.spool_depth == 0  # nothing happens before the batch window ends
    clock.advance(WINDOW)
    assert [result_of(d) for d in recorded] == [None] * 5
    assert recorder.spool_depth == 5
    assert recorder.health() == {
        "ok": False,
        "spool_depth": 5,
        "spool_writable": True,
        "redis": False,
    }
    assert len((tmp_path / "usage-spool.jsonl").read_bytes().splitlines()) == 5
    clock.advance(0.5)  # still down: the retry backs off
    assert recorder.spool_depth == 5
    store.down = False
    clock.advance(1.0)
    assert recorder.spool_depth == 0
    assert (tmp_path / "usage-spool.jsonl").read_bytes() == b""
    assert report(recorder).totals.queries == 5
    assert recorder.health()["ok"] is True
    result_of(recorder.stop())


def test_records_skip_a_store_known_to_fail_and_return_to_it_once_it_answers(
    tmp_path: Path,
) -> None:
    store, clock = BrokenStore(), Clock()
    recorder = spooling_recorder(tmp_path, store, clock)
    recorder.start()
    recorder.record(event("q0"))
    clock.advance(WINDOW)
    assert (store.attempts, recorder.spool_depth) == (1, 1)
    for i in range(1, 5):
        recorder.record(event(f"q{i}"))
    clock.advance(WINDOW)
    assert (store.attempts, recorder.spool_depth) == (1, 5)  # no wait on a failing store
    store.down = False
    # Budget checks do not wait on it either. The probe finds it answering again; the backlog
    # is replayed in order and new records go to the store.
    assert result_of(recorder.check_budget("alice", "p1")).allowed
    assert store.spend_attempts == 0
    clock.advance(0.25)
    assert (store.attempts, recorder.spool_depth) == (6, 0)
    recorder.record(event("q5"))
    clock.advance(WINDOW)
    assert (store.attempts, recorder.spool_depth) == (7, 0)
    assert report(recorder).totals.queries == 6
    result_of(recorder.stop())


def test_stop_leaves_what_it_cannot_flush_for_the_next_start(tmp_path: Path) -> None:
    store, clock = BrokenStore(), Clock()
    recorder = spooling_recorder(tmp_path, store, clock)
    recorder.start()
    recorded = [recorder.record(event("a")), recorder.record(event("b"))]
    result_of(recorder.stop())  # the queued events are handled first
    assert [result_of(d) for d in recorded] == [None, None]
    assert len((tmp_path / "usage-spool.jsonl").read_bytes().splitlines()) == 2
    # Recorded after stop: straight to the spool (opened again), never dropped.
    result_of(recorder.record(event("c")))
    assert recorder.spool_depth == 3
    result_of(recorder.stop())

    store.down = False
    clock = Clock()
    successor = spooling_recorder(tmp_path, store, clock)
    successor.start()
    assert successor.spool_depth == 3
    clock.advance(WINDOW)
    assert successor.spool_depth == 0
    assert report(successor).totals.queries == 3
    result_of(successor.stop())


def test_record_never_fails_even_when_nothing_works(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store, clock = BrokenStore(), Clock()
    recorder = UsageRecorder(store, clock, PRICES, spool=Spool(blocker / "spool"), now=Now())
    with pytest.raises(Exception, match="spool_dir"):
        recorder.start()
    kept = recorder.record(event("kept"))
    clock.advance(WINDOW)
    assert result_of(kept) is None
    assert recorder.spool_depth == 1
    assert recorder.health()["spool_writable"] is False
    store.down = False
    clock.advance(1)
    assert recorder.spool_depth == 0
    assert report(recorder).totals.queries == 1


def test_spool_replay_counts_records_already_applied_once(tmp_path: Path) -> None:
    store, clock = BrokenStore(), Clock()
    store.down = False
    spool = Spool(tmp_path)
    spool.open()
    for i in range(4):
        result_of(spool.append(record_of(f"q{i}")))
    result_of(spool.close())
    # A crash after the first two were replayed but before the spool was truncated.
    for i in range(2):
        result_of(store.apply(record_of(f"q{i}"), 2**40, 2**40))
    recorder = spooling_recorder(tmp_path, store, clock)
    recorder.start()
    clock.advance(WINDOW)
    assert recorder.spool_depth == 0
    assert report(recorder).totals.queries == 4
    assert os.path.getsize(tmp_path / "usage-spool.jsonl") == 0


class WatchedStore(MemoryUsageStore):
    """Notes what a socket's peer had already received when a record reached the store."""

    def __init__(self) -> None:
        super().__init__(time.time)
        self.peer: socket.socket | None = None
        self.received_before: list[bytes] = []

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        assert self.peer is not None
        try:
            self.received_before.append(self.peer.recv(100, socket.MSG_DONTWAIT))
        except BlockingIOError:
            self.received_before.append(b"")
        return super().apply(record, expire_at, month_expire_at)


@pytest.mark.parametrize("window", [0, WINDOW])
@pytest_twisted.ensureDeferred
async def test_what_the_caller_sends_right_after_record_leaves_before_recording_starts(
    window: float,
) -> None:
    from twisted.internet import reactor

    store = WatchedStore()
    recorder = UsageRecorder(store, reactor, PRICES, batch_seconds=window)
    recorded: Deferred[None] = Deferred()

    class Gateway(Protocol):
        def dataReceived(self, data: bytes) -> None:
            # What agentd's session does with an agent's done: record, then forward.
            recorder.record(event("q1", timestamp=time.time())).chainDeferred(recorded)
            self.transport.write(b"done")  # type: ignore[attr-defined]

    with socket.create_server(("127.0.0.1", 0)) as listener:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
        gateway = await connectProtocol(endpoint, Gateway())
        store.peer, _ = listener.accept()
        try:
            store.peer.sendall(b"agent output")
            await recorded
            assert store.received_before == [b"done"]
        finally:
            gateway.transport.loseConnection()  # type: ignore[attr-defined]
            store.peer.close()


class CountingStore(MemoryUsageStore):
    """Counts the calls that reach the store, and the records in each."""

    def __init__(self) -> None:
        super().__init__(Now())
        self.calls: list[int] = []

    def apply_all(
        self, items: Sequence[tuple[UsageRecord, int, int]], timeout: float | None = None
    ) -> Deferred[list[str]]:
        self.calls.append(len(items))
        return super().apply_all(items, timeout)


def test_the_records_of_one_window_share_one_call_to_the_store() -> None:
    store, clock = CountingStore(), Clock()
    recorder = UsageRecorder(store, clock, PRICES, batch_seconds=0.02, now=Now())
    recorded = [recorder.record(event("q0"))]
    clock.advance(0.01)
    recorded += [recorder.record(event("q1")), recorder.record(event("q2"))]
    clock.advance(0.0099)
    assert store.calls == []  # the window is counted from its first record
    assert not any(d.called for d in recorded)
    clock.advance(0.0001)
    assert store.calls == [3]
    assert [result_of(d) for d in recorded] == [None] * 3
    # The next record opens a new window.
    later = recorder.record(event("q3"))
    clock.advance(0.019)
    assert store.calls == [3]
    clock.advance(0.001)
    assert (store.calls, result_of(later)) == ([3, 1], None)
    assert report(recorder).totals.queries == 4


def test_a_full_chunk_goes_when_a_prompt_has_gone_to_its_agent() -> None:
    store, clock = CountingStore(), Clock()
    recorder = UsageRecorder(store, clock, PRICES, batch_seconds=0.5, now=Now())
    recorded = [recorder.record(event(f"q{i}")) for i in range(FLUSH_CHUNK + 2)]
    clock.advance(0)
    assert store.calls == []
    recorder.waiting_for_agent()
    assert store.calls == [FLUSH_CHUNK]
    assert [result_of(d) for d in recorded[:FLUSH_CHUNK]] == [None] * FLUSH_CHUNK
    # Two are not a chunk: they wait for the window, counted from the first record.
    recorder.waiting_for_agent()
    clock.advance(0.49)
    assert store.calls == [FLUSH_CHUNK]
    clock.advance(0.01)
    clock.advance(0)
    assert store.calls == [FLUSH_CHUNK, 2]
    assert [result_of(d) for d in recorded] == [None] * (FLUSH_CHUNK + 2)
    assert report(recorder).totals.queries == FLUSH_CHUNK + 2
    assert clock.getDelayedCalls() == []


def test_a_full_chunk_taken_early_leaves_no_timer_and_the_next_record_opens_a_window() -> None:
    store, clock = CountingStore(), Clock()
    recorder = UsageRecorder(store, clock, PRICES, batch_seconds=0.5, now=Now())
    for i in range(FLUSH_CHUNK):
        recorder.record(event(f"q{i}"))
    recorder.waiting_for_agent()
    assert (store.calls, clock.getDelayedCalls()) == ([FLUSH_CHUNK], [])
    recorder.record(event("late"))
    clock.advance(0.5)
    clock.advance(0)
    assert store.calls == [FLUSH_CHUNK, 1]


def test_with_no_prompt_going_out_a_full_chunk_waits_for_its_window() -> None:
    store, clock = CountingStore(), Clock()
    recorder = UsageRecorder(store, clock, PRICES, batch_seconds=0.5, now=Now())
    for i in range(2 * FLUSH_CHUNK + 1):
        recorder.record(event(f"q{i}"))
    clock.advance(0.49)
    assert store.calls == []
    clock.advance(0.01)
    # The window is over: a chunk a reactor round, so none holds the reactor long.
    for _ in range(4):
        clock.advance(0)
    assert store.calls == [FLUSH_CHUNK, FLUSH_CHUNK, 1]
    assert clock.getDelayedCalls() == []


def test_a_window_of_zero_records_after_the_current_pass() -> None:
    store, clock = CountingStore(), Clock()
    recorder = UsageRecorder.from_config(UsageConfig(batch_ms=0), None, clock, PRICES, now=Now())
    recorder._store = store  # the store the recorder made, counted
    d = recorder.record(event("q0"))
    assert store.calls == []
    clock.advance(0)
    assert (store.calls, result_of(d)) == ([1], None)


def test_stop_records_the_open_window_at_once_and_leaves_no_timer() -> None:
    store, clock = CountingStore(), Clock()
    recorder = UsageRecorder(store, clock, PRICES, batch_seconds=0.02, now=Now())
    recorded = [recorder.record(event("q0")), recorder.record(event("q1"))]
    result_of(recorder.stop())
    assert store.calls == [2]
    assert [result_of(d) for d in recorded] == [None, None]
    assert clock.getDelayedCalls() == []


def test_an_event_that_cannot_be_recorded_is_refused_at_once() -> None:
    store, clock = CountingStore(), Clock()
    recorder = UsageRecorder(store, clock, PRICES, batch_seconds=0.02, now=Now())
    before = sample("agentd_usage_events_total", result="failed")
    # An event refused as it comes does not wait for the window, and opens none.
    assert result_of(recorder.record(event("q0", input_tokens=-1))) is None
    assert sample("agentd_usage_events_total", result="failed") == before + 1
    assert clock.getDelayedCalls() == []
    assert store.calls == []


@pytest.mark.parametrize("batch_ms", [-1, 1001])
def test_the_batch_window_is_bounded(batch_ms: int) -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict({"usage": {"batch_ms": batch_ms}}, env={})
    assert (caught.value.key, caught.value.problem) == (
        "[usage] batch_ms",
        "must be between 0 and 1000",
    )
    assert from_dict({"usage": {"batch_ms": 0}}, env={}).usage.batch_ms == 0


def test_identifiers_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(ValueError):
        UsageRecord.from_event(event(user="alice\n"), PRICES)
    with pytest.raises(ValueError):
        parse_month("2026-11\n")
    assert (
        UsageEvent.from_agent_usage(
            {"inputTokens": 1, "model": "m\n"},
            query_id="q",
            user="u",
            project="p",
            agent="echo",
            timestamp=NOW,
        )
        is None
    )
