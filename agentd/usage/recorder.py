"""Usage metering: every finished query recorded exactly once, summed per day, read as bills.

A usage event becomes one ``UsageRecord``: validated, with its cost in integer micro-dollars
(the agent's reported cost, else priced from the price table). One atomic step applies it: it
writes the "already recorded" marker (the query's record) together with the daily increments
and their expiry, or, when the marker exists, changes nothing. With Redis that step is a Lua
script; without Redis an in-process store keeps the same keys under the same rules.

When Redis fails or is slow, records go to an append-only spool file, fsynced before the record
counts as handled, and are replayed in order, through the same idempotent step, once Redis
answers again or when agentd next starts; while Redis is known to fail, new records go straight
to the spool. Monthly reports and budgets read the month's day keys by name, never with
``KEYS`` or ``SCAN``. docs/usage.md describes the key layout, retention, prices, budgets, the
spool and the HTTP API.
"""

from __future__ import annotations

import argparse
import calendar
import csv
import dataclasses
import datetime
import fcntl
import io
import json
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, FirstError, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from agentd import metrics
from agentd.config import AGENT_NAME_RE, PROJECT_RE, USER_RE, ConfigError, UsageConfig, load
from agentd.pricing import PriceTable
from agentd.redisstore import RedisStore, RedisURLError

_log = Logger()

MICRO_USD = 1_000_000
# Far beyond any real query; they keep a buggy or hostile agent from poisoning a bill.
MAX_TOKENS = 10**9
MAX_COST_USD = 100_000.0

KEY_PREFIX = "{usage}"
BUDGETS_KEY = f"{KEY_PREFIX}:budgets"
# The counters of every day hash, in this order in scripts and reports. ``cost`` and
# ``cost_user_key`` are micro-dollars; ``cost_user_key`` is the part paid with the user's own
# provider key. ``queries_priced`` / ``queries_unpriced`` count the queries whose cost agentd
# computed from the price table / could not price (no reported cost, no price: cost 0).
COUNTER_FIELDS = (
    "cost",
    "cost_user_key",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "queries",
    "queries_priced",
    "queries_unpriced",
)
SCOPES = ("user", "project")
KEY_SOURCES = ("operator", "user")
OUTCOMES = ("done", "aborted", "error")
COST_SOURCES = ("reported", "priced", "unpriced")

SPOOL_FILE = "usage-spool.jsonl"
SPOOL_LOCK = "usage-spool.lock"

_DAY_SECONDS = 86_400
_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
_EVENTS = {
    result: metrics.USAGE_EVENTS.labels(result)
    for result in ("recorded", "duplicate", "spooled", "replayed", "failed")
}
_QUERY_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_MODEL_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_MONTH_RE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
_AGENT_FIELDS = ("inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens", "cost")
# Records handled per reactor round, so that a burst never holds the reactor (and the replies
# that would beat the timeout) for long.
_FLUSH_CHUNK = 64
_DRAIN_BATCH = 50
# Replays are on nobody's path: they wait longer before calling Redis slow.
_REPLAY_TIMEOUT = 1.0
_BACKOFF_FIRST = 0.5
_BACKOFF_CAP = 5.0
_STOP_FLUSH_SECONDS = 5.0
_READ_TIMEOUT = 2.0


# --- Months, days and expiry (all UTC) ---------------------------------------------------


def parse_month(text: str) -> str:
    """``YYYY-MM`` from 1970-01 to 9999-12, or ValueError."""
    match = _MONTH_RE.fullmatch(text)
    if match is None or int(match.group(1)) < 1970:
        raise ValueError("month must be YYYY-MM")
    return text


def month_of(timestamp: float) -> str:
    return _utc_day(timestamp).strftime("%Y-%m")


def month_days(month: str) -> list[datetime.date]:
    year, number = int(month[:4]), int(month[5:7])
    days = calendar.monthrange(year, number)[1]
    return [datetime.date(year, number, day) for day in range(1, days + 1)]


def day_expiry(day: datetime.date, retention_days: int) -> int:
    """When a day's keys expire: ``retention_days`` full days after the day ends."""
    return calendar.timegm(day.timetuple()) + (retention_days + 1) * _DAY_SECONDS


def month_expiry(month: str, retention_days: int) -> int:
    """When a month's index sets expire: with the month's last day."""
    return day_expiry(month_days(month)[-1], retention_days)


def _utc_day(timestamp: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).date()


# --- Key layout (docs/usage.md) ------------------------------------------------------------
# Every key carries the hash tag {usage}: the recording script touches a query's marker, three
# day hashes and two index sets at once, and one slot is the only way those stay one atomic
# step on a Redis Cluster.


def user_day_key(user: str, day: datetime.date) -> str:
    return f"{KEY_PREFIX}:day:user:{user}:{day.isoformat()}"


def project_day_key(project: str, day: datetime.date) -> str:
    return f"{KEY_PREFIX}:day:project:{project}:{day.isoformat()}"


def user_project_day_key(user: str, project: str, day: datetime.date) -> str:
    return f"{KEY_PREFIX}:day:user-project:{user}:{project}:{day.isoformat()}"


def user_projects_key(user: str, month: str) -> str:
    return f"{KEY_PREFIX}:projects:{user}:{month}"


def project_users_key(project: str, month: str) -> str:
    return f"{KEY_PREFIX}:users:{project}:{month}"


def query_key(query_id: str) -> str:
    return f"{KEY_PREFIX}:query:{query_id}"


def soft_warning_key(scope: str, subject: str, month: str) -> str:
    return f"{KEY_PREFIX}:soft-warning:{scope}:{subject}:{month}"


def budget_field(scope: str, subject: str) -> str:
    return f"{scope}:{subject}"


# --- Events and records --------------------------------------------------------------------


@dataclass(frozen=True)
class UsageEvent:
    """What the gateway knows when a query ends: who, where, which model, how many tokens."""

    query_id: str
    user: str
    project: str
    agent: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reported_cost: float | None
    timestamp: float
    key_source: str = "operator"
    outcome: str = "done"

    @classmethod
    def from_agent_usage(
        cls,
        usage: Any,
        *,
        query_id: str,
        user: str,
        project: str,
        agent: str,
        timestamp: float,
        key_source: str = "operator",
        outcome: str = "done",
    ) -> UsageEvent | None:
        """The agent's ``usage`` object as an event, or None when it is malformed.

        Token counts are non-negative integers (absent or null: 0), ``cost`` a non-negative
        number of USD (absent or null: not reported), ``model`` a name (absent: the agent's
        name). Input tokens exclude cache tokens, which are reported on their own.
        """
        if not isinstance(usage, dict) or not any(k in usage for k in _AGENT_FIELDS):
            return None
        try:
            tokens = [_token_count(usage.get(name)) for name in _AGENT_FIELDS[:4]]
            cost = usage.get("cost")
            if cost is not None:
                _micro_usd(cost)
        except ValueError:
            return None
        model = usage.get("model")
        model = agent if model is None else model
        if not isinstance(model, str) or not _MODEL_RE.fullmatch(model):
            return None
        return cls(
            query_id=query_id,
            user=user,
            project=project,
            agent=agent,
            model=model,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            cache_read_tokens=tokens[2],
            cache_write_tokens=tokens[3],
            reported_cost=None if cost is None else float(cost),
            timestamp=timestamp,
            key_source=key_source,
            outcome=outcome,
        )


def _token_count(value: Any) -> int:
    """An agent's token count: null is 0, integral floats are accepted."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    _check_count("token count", value)
    return int(value)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ValueError(f"{name} must be an integer from 0 to {MAX_TOKENS}")


def _check_timestamp(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("timestamp must be UNIX seconds")
    if not 0 < value < 253402300800:
        raise ValueError("timestamp must be UNIX seconds between 1970 and 9999")


def _micro_usd(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("cost must be a number")
    if not math.isfinite(value) or not 0 <= value <= MAX_COST_USD:
        raise ValueError(f"cost must be between 0 and {MAX_COST_USD:.0f} USD")
    return round(value * MICRO_USD)


def _usd(micro: int) -> float:
    return micro / MICRO_USD


def _usd_text(micro: int) -> str:
    """Exact decimal USD: micro-dollars are integers, so no float rounding shows."""
    return f"{micro // MICRO_USD}.{micro % MICRO_USD:06d}"


@dataclass(frozen=True)
class UsageRecord:
    """An event validated and priced: what the store applies and the spool keeps.

    ``cost`` is micro-USD; ``cost_source`` says whether it is the agent's reported cost, agentd's
    price-table cost or unpriced (0).
    """

    query_id: str
    user: str
    project: str
    agent: str
    model: str
    timestamp: float
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost: int
    cost_source: str
    key_source: str
    outcome: str

    def __post_init__(self) -> None:
        checks = (
            ("query_id", _QUERY_ID_RE),
            ("user", USER_RE),
            ("project", PROJECT_RE),
            ("agent", AGENT_NAME_RE),
            ("model", _MODEL_RE),
        )
        for name, pattern in checks:
            value = getattr(self, name)
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"invalid {name}")
        _check_timestamp(self.timestamp)
        for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"):
            _check_count(name, getattr(self, name))
        if isinstance(self.cost, bool) or not isinstance(self.cost, int):
            raise ValueError("cost must be integer micro-dollars")
        if not 0 <= self.cost <= MAX_COST_USD * MICRO_USD:
            raise ValueError("cost out of range")
        for name, allowed in (
            ("cost_source", COST_SOURCES),
            ("key_source", KEY_SOURCES),
            ("outcome", OUTCOMES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")

    @classmethod
    def from_event(cls, event: UsageEvent, prices: PriceTable) -> UsageRecord:
        """Validate and price ``event`` (ValueError when it cannot be recorded)."""
        _check_timestamp(event.timestamp)
        tokens = (
            event.input_tokens,
            event.output_tokens,
            event.cache_read_tokens,
            event.cache_write_tokens,
        )
        for count in tokens:
            _check_count("token count", count)
        if event.reported_cost is not None:
            cost, source = _micro_usd(event.reported_cost), "reported"
        else:
            priced = prices.cost(event.model, *tokens, on=_utc_day(event.timestamp))
            cost, source = (0, "unpriced") if priced is None else (_micro_usd(priced), "priced")
        return cls(
            query_id=event.query_id,
            user=event.user,
            project=event.project,
            agent=event.agent,
            model=event.model,
            timestamp=event.timestamp,
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
            cache_read_tokens=event.cache_read_tokens,
            cache_write_tokens=event.cache_write_tokens,
            cost=cost,
            cost_source=source,
            key_source=event.key_source,
            outcome=event.outcome,
        )

    @cached_property
    def day(self) -> datetime.date:
        return _utc_day(self.timestamp)

    @cached_property
    def month(self) -> str:
        return self.day.strftime("%Y-%m")

    def counters(self) -> dict[str, int]:
        """This query's increments to every day hash it touches."""
        return {
            "cost": self.cost,
            "cost_user_key": self.cost if self.key_source == "user" else 0,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "queries": 1,
            "queries_priced": int(self.cost_source == "priced"),
            "queries_unpriced": int(self.cost_source == "unpriced"),
        }

    def to_line(self) -> bytes:
        """The record as one JSON line: the spool's format and the marker's value in Redis."""
        data = {"v": 1, **{name: getattr(self, name) for name in _RECORD_FIELDS}}
        return json.dumps(data, separators=(",", ":")).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> UsageRecord:
        try:
            data = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("not JSON") from None
        if not isinstance(data, dict) or data.pop("v", None) != 1:
            raise ValueError("not a version 1 usage record")
        if set(data) != set(_RECORD_FIELDS):
            raise ValueError("fields do not match a usage record")
        return cls(**data)

    def keys(self) -> list[str]:
        """Every key one application touches, in the recording script's KEYS order."""
        day, month = self.day, self.month
        return [
            query_key(self.query_id),
            user_day_key(self.user, day),
            project_day_key(self.project, day),
            user_project_day_key(self.user, self.project, day),
            user_projects_key(self.user, month),
            project_users_key(self.project, month),
        ]


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))


# --- Reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Totals:
    """Sums of the day-hash counters; money in micro-dollars."""

    cost: int = 0
    cost_user_key: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    queries: int = 0
    queries_priced: int = 0
    queries_unpriced: int = 0

    @classmethod
    def from_hash(cls, values: Mapping[str, str]) -> Totals:
        return cls(*(int(values.get(name) or 0) for name in COUNTER_FIELDS))

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, n) + getattr(other, n) for n in COUNTER_FIELDS))

    @property
    def operator_cost(self) -> int:
        """What the operator's provider keys paid: the spend budgets count."""
        return self.cost - self.cost_user_key

    def as_dict(self) -> dict[str, Any]:
        return {
            "cost_usd": _usd(self.cost),
            "cost_micro_usd": self.cost,
            "user_key_cost_usd": _usd(self.cost_user_key),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "queries": self.queries,
            "priced_queries": self.queries_priced,
            "unpriced_queries": self.queries_unpriced,
        }

    def csv_cells(self) -> list[str]:
        return [
            _usd_text(self.cost),
            _usd_text(self.cost_user_key),
            *(str(getattr(self, n)) for n in COUNTER_FIELDS[2:]),
        ]


CSV_COLUMNS = (
    "cost_usd",
    "user_key_cost_usd",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "queries",
    "priced_queries",
    "unpriced_queries",
)


@dataclass(frozen=True)
class UsageReport:
    """One user's or project's month: totals, the days with usage, and the breakdown by
    project (for a user) or by user (for a project)."""

    scope: str
    subject: str
    month: str
    totals: Totals
    days: tuple[tuple[datetime.date, Totals], ...]
    breakdown: tuple[tuple[str, Totals], ...]

    @property
    def breakdown_name(self) -> str:
        return "project" if self.scope == "user" else "user"

    def as_json(self) -> dict[str, Any]:
        name = self.breakdown_name
        return {
            "scope": self.scope,
            self.scope: self.subject,
            "month": self.month,
            "totals": self.totals.as_dict(),
            "days": [{"date": day.isoformat(), **t.as_dict()} for day, t in self.days],
            f"{name}s": [{name: key, **t.as_dict()} for key, t in self.breakdown],
        }

    def as_csv(self) -> str:
        """One ``total`` row, one ``day`` row per day with usage, one row per project (or user)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["row", "date", self.breakdown_name, *CSV_COLUMNS])
        writer.writerow(["total", self.month, "", *self.totals.csv_cells()])
        for day, totals in self.days:
            writer.writerow(["day", day.isoformat(), "", *totals.csv_cells()])
        for key, totals in self.breakdown:
            writer.writerow([self.breakdown_name, "", key, *totals.csv_cells()])
        return out.getvalue()


@dataclass(frozen=True)
class MonthSpend:
    """Operator-paid micro-dollars this month, and the runtime budget overrides as stored."""

    user: int
    project: int
    user_budget: str | None
    project_budget: str | None


@dataclass(frozen=True)
class BudgetDecision:
    """May a prompt go ahead. When refused: which budget (``scope``), its amount and the
    month-to-date spend that reached it; when allowed: the user's budget (None: none) and
    spend."""

    allowed: bool
    scope: str | None
    budget_usd: float | None
    spent_usd: float


# --- Stores --------------------------------------------------------------------------------


class UsageStore(Protocol):
    """Where records are applied and month data read; Redis and in-memory behave alike."""

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        """Apply once: ``recorded``, ``duplicate`` or ``expired`` (older than retention).
        ``timeout`` overrides the store's own."""
        ...

    def spend(
        self, user: str, project: str, days: Sequence[datetime.date]
    ) -> Deferred[MonthSpend]: ...

    def read(
        self, hash_keys: Sequence[str], set_keys: Sequence[str]
    ) -> Deferred[tuple[list[dict[str, str]], list[set[str]]]]: ...

    def set_budget(self, field: str, value: str | None) -> Deferred[None]: ...

    def claim(self, key: str, ttl: int) -> Deferred[bool]:
        """True for the first caller until ``key`` expires after ``ttl`` seconds."""
        ...


# KEYS[1]   the query's record: the "already recorded" marker
# KEYS[2-4] the user's, the project's and the user-in-project day hashes
# KEYS[5-6] the month's index sets: the user's projects, the project's users
# ARGV      day expiry, month expiry (UNIX seconds), user, project, the record (a JSON line),
#           the increments of the counters in the table below, in its order, comma-separated
# Returns   0: duplicate (nothing written), 2: older than retention (nothing written), or
#           1: recorded. The marker is written here with the increments, never before. Integer
#           replies, because txredisapi parses those in bulk and bulk strings one per turn.
APPLY_SCRIPT = """
local counters = {COUNTERS}
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if tonumber(ARGV[1]) <= tonumber(redis.call('TIME')[1]) then
  return 2
end
local increments = {}
for increment in string.gmatch(ARGV[6], '[^,]+') do
  increments[#increments + 1] = increment
end
for i = 2, 4 do
  for j = 1, #counters do
    redis.call('HINCRBY', KEYS[i], counters[j], increments[j])
  end
  redis.call('EXPIREAT', KEYS[i], ARGV[1])
end
redis.call('SADD', KEYS[5], ARGV[4])
redis.call('EXPIREAT', KEYS[5], ARGV[2])
redis.call('SADD', KEYS[6], ARGV[3])
redis.call('EXPIREAT', KEYS[6], ARGV[2])
redis.call('SET', KEYS[1], ARGV[5])
redis.call('EXPIREAT', KEYS[1], ARGV[1])
return 1
""".replace("{COUNTERS}", "{" + ", ".join(f"'{name}'" for name in COUNTER_FIELDS) + "}")
_APPLY_RESULTS = {0: "duplicate", 1: "recorded", 2: "expired"}

# KEYS[1]   the budget overrides hash
# KEYS[2..] N user day hashes, then N project day hashes
# ARGV      N, the user's and the project's override fields
# Returns   {user spend, project spend, user override, project override}: spend is what the
#           operator paid, in micro-dollars (exact: Lua numbers are doubles, sums stay < 2^53).
SPEND_SCRIPT = """
local n = tonumber(ARGV[1])
local function spent(first)
  local total = 0
  for i = first, first + n - 1 do
    local v = redis.call('HMGET', KEYS[i], 'cost', 'cost_user_key')
    total = total + (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0)
  end
  return total
end
local budgets = redis.call('HMGET', KEYS[1], ARGV[2], ARGV[3])
return {spent(2), spent(n + 2), budgets[1], budgets[2]}
"""


def _apply_arguments(record: UsageRecord, expire_at: int, month_expire_at: int) -> list[Any]:
    # Few arguments: txredisapi encodes each one in Python, the dearest part of a record.
    counters = record.counters()
    increments = ",".join(str(counters[name]) for name in COUNTER_FIELDS)
    return [expire_at, month_expire_at, record.user, record.project, record.to_line(), increments]


def _first_failure(failure: Failure) -> Failure:
    """A DeferredList's first failure itself, so that a timeout reads as one."""
    first = failure.value
    return first.subFailure if isinstance(first, FirstError) else failure


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisUsageStore:
    """The usage keys in Redis: one script per record, one per budget check, pipelined reads."""

    def __init__(self, redis: RedisStore) -> None:
        self._redis = redis

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        args = _apply_arguments(record, expire_at, month_expire_at)
        d = self._redis.eval("usage_record", APPLY_SCRIPT, record.keys(), args, timeout)
        return d.addCallback(lambda reply: _APPLY_RESULTS[int(reply)])

    def spend(self, user: str, project: str, days: Sequence[datetime.date]) -> Deferred[MonthSpend]:
        keys = [BUDGETS_KEY]
        keys += [user_day_key(user, day) for day in days]
        keys += [project_day_key(project, day) for day in days]
        args = [len(days), budget_field("user", user), budget_field("project", project)]
        d = self._redis.eval("usage_budget", SPEND_SCRIPT, keys, args)

        def parsed(reply: list[Any]) -> MonthSpend:
            return MonthSpend(int(reply[0]), int(reply[1]), _text(reply[2]), _text(reply[3]))

        d.addCallback(parsed)
        return d

    def read(
        self, hash_keys: Sequence[str], set_keys: Sequence[str]
    ) -> Deferred[tuple[list[dict[str, str]], list[set[str]]]]:
        def pipelined(connection: Any) -> Deferred[list[Any]]:
            # Sent back to back on one connection without waiting for replies: one round trip.
            calls = [connection.hgetall(key) for key in hash_keys]
            calls += [connection.smembers(key) for key in set_keys]
            replies = DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
            replies.addErrback(_first_failure)
            return replies.addCallback(lambda results: [value for _, value in results])

        d = self._redis.call(
            "usage_read", pipelined, timeout=max(self._redis.timeout, _READ_TIMEOUT)
        )

        def split(values: list[Any]) -> tuple[list[dict[str, str]], list[set[str]]]:
            hashes = [{str(k): str(v) for k, v in h.items()} for h in values[: len(hash_keys)]]
            sets = [{str(m) for m in s} for s in values[len(hash_keys) :]]
            return hashes, sets

        return d.addCallback(split)

    def set_budget(self, field: str, value: str | None) -> Deferred[None]:
        if value is None:
            d = self._redis.call("usage_budget_set", lambda c: c.hdel(BUDGETS_KEY, field))
        else:
            d = self._redis.call("usage_budget_set", lambda c: c.hset(BUDGETS_KEY, field, value))
        d.addCallback(lambda _: None)
        return d

    def claim(self, key: str, ttl: int) -> Deferred[bool]:
        d = self._redis.call(
            "usage_soft_warning",
            lambda c: c.set(key, "1", expire=ttl, only_if_not_exists=True),
        )
        d.addCallback(lambda reply: reply is not None)
        return d


class MemoryUsageStore:
    """The same keys and rules in this process, for agentd without Redis."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._values: dict[str, bytes] = {}
        self._hashes: dict[str, dict[str, str]] = {}
        self._sets: dict[str, set[str]] = {}
        self._expiry: dict[str, float] = {}
        self._next_sweep = 0.0

    def _live(self, key: str) -> bool:
        expiry = self._expiry.get(key)
        if expiry is not None and expiry <= self._now():
            self._values.pop(key, None)
            self._hashes.pop(key, None)
            self._sets.pop(key, None)
            del self._expiry[key]
        return key in self._values or key in self._hashes or key in self._sets

    def _sweep(self) -> None:
        """Forget expired keys nobody reads any more (at most hourly)."""
        now = self._now()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 3600
        for key in [k for k, expiry in self._expiry.items() if expiry <= now]:
            self._live(key)

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        self._sweep()
        marker, *day_keys, projects, users = record.keys()
        if self._live(marker):
            return succeed("duplicate")
        if expire_at <= self._now():
            return succeed("expired")
        for key in day_keys:
            values = self._hashes[key] if self._live(key) else self._hashes.setdefault(key, {})
            for name, increment in record.counters().items():
                values[name] = str(int(values.get(name, "0")) + increment)
            self._expiry[key] = expire_at
        for key, member in ((projects, record.project), (users, record.user)):
            members = self._sets[key] if self._live(key) else self._sets.setdefault(key, set())
            members.add(member)
            self._expiry[key] = month_expire_at
        self._values[marker] = record.to_line()
        self._expiry[marker] = expire_at
        return succeed("recorded")

    def _hash(self, key: str) -> dict[str, str]:
        return dict(self._hashes.get(key, {})) if self._live(key) else {}

    def spend(self, user: str, project: str, days: Sequence[datetime.date]) -> Deferred[MonthSpend]:
        def spent(keys: Iterable[str]) -> int:
            return sum(Totals.from_hash(self._hash(key)).operator_cost for key in keys)

        budgets = self._hashes.get(BUDGETS_KEY, {})
        return succeed(
            MonthSpend(
                user=spent(user_day_key(user, day) for day in days),
                project=spent(project_day_key(project, day) for day in days),
                user_budget=budgets.get(budget_field("user", user)),
                project_budget=budgets.get(budget_field("project", project)),
            )
        )

    def read(
        self, hash_keys: Sequence[str], set_keys: Sequence[str]
    ) -> Deferred[tuple[list[dict[str, str]], list[set[str]]]]:
        sets = [set(self._sets.get(k, ())) if self._live(k) else set() for k in set_keys]
        return succeed(([self._hash(key) for key in hash_keys], sets))

    def set_budget(self, field: str, value: str | None) -> Deferred[None]:
        budgets = self._hashes.setdefault(BUDGETS_KEY, {})
        if value is None:
            budgets.pop(field, None)
        else:
            budgets[field] = value
        return succeed(None)

    def claim(self, key: str, ttl: int) -> Deferred[bool]:
        if self._live(key):
            return succeed(False)
        self._values[key] = b"1"
        self._expiry[key] = self._now() + ttl
        return succeed(True)


async def read_report(store: UsageStore, scope: str, subject: str, month: str) -> UsageReport:
    """Sum the month's day keys, read by name (two pipelined round trips, no KEYS/SCAN)."""
    days = month_days(month)
    if scope == "user":
        day_keys = [user_day_key(subject, day) for day in days]
        index = user_projects_key(subject, month)
    else:
        day_keys = [project_day_key(subject, day) for day in days]
        index = project_users_key(subject, month)
    hashes, (members,) = await store.read(day_keys, [index])
    daily = [(day, Totals.from_hash(h)) for day, h in zip(days, hashes, strict=True)]
    names = sorted(members)
    breakdown_keys = [
        user_project_day_key(subject, name, day)
        if scope == "user"
        else user_project_day_key(name, subject, day)
        for name in names
        for day in days
    ]
    split: list[tuple[str, Totals]] = []
    if names:
        per_day, _ = await store.read(breakdown_keys, [])
        for i, name in enumerate(names):
            rows = per_day[i * len(days) : (i + 1) * len(days)]
            split.append((name, sum((Totals.from_hash(h) for h in rows), Totals())))
    return UsageReport(
        scope=scope,
        subject=subject,
        month=month,
        totals=sum((t for _, t in daily), Totals()),
        days=tuple((day, t) for day, t in daily if t.queries),
        breakdown=tuple((name, t) for name, t in split if t.queries),
    )


# --- The spool -----------------------------------------------------------------------------


class SpoolLockedError(RuntimeError):
    """Another agentd process owns this spool directory."""


def default_spool_dir(env: Mapping[str, str], cwd: Path) -> Path:
    """``$STATE_DIRECTORY`` (systemd's StateDirectory=), else ``$XDG_STATE_HOME/agentd``, else
    ``var/agentd`` under the working directory."""
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg:
        return Path(xdg) / "agentd"
    return cwd / "var" / "agentd"


class _DaemonThread(threading.Thread):
    """The spool's writer. A daemon, so that a process that never stops its recorder still
    exits; a write cut short then is a crash like any other, and nobody relied on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, daemon=True, **kwargs)


class Spool:
    """Usage records Redis has not confirmed: in memory, and in an fsynced append-only file.

    Writes happen in order on one worker thread (inline without a reactor that has threads),
    so the reactor never waits for the disk; appends queued while a write is in progress are
    written and fsynced together. ``append`` fires once its line is on disk. When every record
    has been applied, the file is truncated. A file lock keeps two processes apart.
    """

    def __init__(self, directory: Path, threads: IReactorThreads | None = None) -> None:
        self.directory = directory
        self.path = directory / SPOOL_FILE
        self.writable = True
        self._threads = threads
        self._pool: ThreadPool | None = None
        self._records: deque[UsageRecord] = deque()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._ops: deque[tuple[bytes | None, Deferred[None]]] = deque()
        self._busy = False
        self._idle: list[Deferred[None]] = []
        self._torn = False

    @property
    def depth(self) -> int:
        return len(self._records)

    def open(self) -> int:
        """Lock the directory and load what a previous process left; returns the count."""
        if self._fd is not None:
            return len(self._records)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(self.directory / SPOOL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolLockedError("used by another agentd process") from None
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._lock_fd, self._fd = lock_fd, fd
        loaded = self._load(data)
        self._records.extendleft(reversed(loaded))
        if self._threads is not None:
            self._pool = ThreadPool(1, 1, "agentd-usage-spool")
            self._pool.threadFactory = _DaemonThread
            self._pool.start()
        return len(loaded)

    def _load(self, data: bytes) -> list[UsageRecord]:
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            # A write the crash cut short: its record() never returned, so nobody relied on it.
            self._torn = True
            _log.warn("usage spool: ignored an incomplete last line in {path}", path=self.path)
        records = []
        for line in lines:
            if not line:
                continue
            try:
                records.append(UsageRecord.from_line(line))
            except (ValueError, TypeError) as e:
                _EVENTS["failed"].inc()
                _log.error(
                    "usage spool: unreadable line in {path} ({reason}): {line}",
                    path=self.path,
                    reason=str(e),
                    line=line[:4096].decode("utf-8", "replace"),
                )
        return records

    def pending(self, count: int) -> list[UsageRecord]:
        return list(islice(self._records, count))

    def append(self, record: UsageRecord) -> Deferred[None]:
        """Keep ``record``; fires (never fails) once it is on disk or the write has failed."""
        line = record.to_line()
        if self._fd is None:
            try:
                self.open()
            except (OSError, SpoolLockedError) as e:
                self._records.append(record)
                self.writable = False
                _log.critical(
                    "usage spool {path} cannot be opened ({reason}); kept in memory only: {line}",
                    path=self.path,
                    reason=str(e),
                    line=line.decode("utf-8").rstrip(),
                )
                return succeed(None)
        self._records.append(record)
        written: Deferred[None] = Deferred()
        self._ops.append((line, written))
        self._next()
        return written

    def acknowledge(self, count: int) -> None:
        """The oldest ``count`` records are applied; truncate the file once none is left."""
        for _ in range(count):
            self._records.popleft()
        if count and not self._records and self._fd is not None:
            self._ops.append((None, Deferred()))
            self._next()

    def close(self) -> Deferred[None]:
        """Finish queued writes, then release the file and the lock; from then on the file is
        what remains (a later ``append`` opens it again)."""
        idle: Deferred[None] = Deferred()
        if self._busy or self._ops:
            self._idle.append(idle)
        else:
            idle.callback(None)
        idle.addCallback(lambda _: self._release())
        return idle

    def _release(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
        self._records.clear()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def _next(self) -> None:
        if self._busy or not self._ops:
            return
        waiters: list[Deferred[None]] = []
        if self._ops[0][0] is None:
            waiters.append(self._ops.popleft()[1])
            job: Callable[[], None] = self._truncate
            lines: list[bytes] = []
        else:
            lines = []
            while self._ops and self._ops[0][0] is not None:
                line, waiter = self._ops.popleft()
                lines.append(cast(bytes, line))
                waiters.append(waiter)
            job = partial(self._write, b"".join(lines))
        self._busy = True
        if self._pool is not None and self._threads is not None:
            d = deferToThreadPool(self._threads, self._pool, job)
        else:
            d = maybeDeferred(job)
        d.addCallbacks(self._written, self._write_failed, errbackArgs=(lines,))
        d.addBoth(self._settle, waiters)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            self._torn = True
            raise
        self._torn = False

    def _truncate(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self._torn = False

    def _written(self, _: None) -> None:
        self.writable = True

    def _write_failed(self, failure: Failure, lines: list[bytes]) -> None:
        self.writable = False
        if not lines:
            # Harmless for billing: the records it still holds are replayed as duplicates.
            _log.failure("usage spool {path}: truncating failed", failure, path=self.path)
            return
        _log.failure(
            "usage spool {path}: write failed; {count} records kept in memory only: {lines}",
            failure,
            path=self.path,
            count=len(lines),
            lines=b"".join(lines).decode("utf-8").rstrip(),
        )

    def _settle(self, _: None, waiters: list[Deferred[None]]) -> None:
        self._busy = False
        for waiter in waiters:
            waiter.callback(None)
        self._next()
        if not self._busy and not self._ops:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)


# --- The recorder --------------------------------------------------------------------------


class UsageRecorder:
    """Records usage events exactly once, checks budgets and reads reports for the gateway."""

    def __init__(
        self,
        store: UsageStore,
        clock: IReactorTime,
        prices: PriceTable,
        *,
        retention_days: int = 90,
        monthly_budget_usd: float = 0.0,
        soft_budget_ratio: float = 0.8,
        spool: Spool | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self._prices = prices
        self._retention_days = retention_days
        self._default_budget = _budget_micro(monthly_budget_usd)
        self._soft_ratio = soft_budget_ratio
        self._spool = spool
        self._now = now
        self._redis_ok: bool | None = None if spool is None else True
        self._stopping = False
        self._inflight = 0
        self._settled_waiters: list[Deferred[None]] = []
        self._draining = False
        self._drain_call: IDelayedCall | None = None
        self._backoff = _BACKOFF_FIRST
        self._budget_probe_at = 0.0
        self._warned_month = ""
        self._warned: set[tuple[str, str]] = set()
        self._queue: list[tuple[UsageEvent, Deferred[None]]] = []
        self._agent_metrics: dict[str, tuple[tuple[Any, ...], Any]] = {}

    @classmethod
    def from_config(
        cls,
        config: UsageConfig,
        store: RedisStore | None,
        clock: IReactorTime,
        prices: PriceTable,
        *,
        now: Callable[[], float] = time.time,
        env: Mapping[str, str] | None = None,
    ) -> UsageRecorder:
        """In-memory without a store; with one, Redis plus a spool in ``[usage] spool_dir``."""
        usage_store: UsageStore
        if store is None:
            usage_store, spool = MemoryUsageStore(now), None
        else:
            directory = (
                Path(config.spool_dir)
                if config.spool_dir
                else default_spool_dir(os.environ if env is None else env, Path.cwd())
            )
            threads = cast(IReactorThreads, clock) if IReactorThreads.providedBy(clock) else None
            usage_store, spool = RedisUsageStore(store), Spool(directory.absolute(), threads)
        return cls(
            usage_store,
            clock,
            prices,
            retention_days=config.retention_days,
            monthly_budget_usd=config.monthly_budget_usd,
            soft_budget_ratio=config.soft_budget_ratio,
            spool=spool,
            now=now,
        )

    # Lifecycle

    def start(self) -> None:
        """Open the spool and replay what a crashed or stopped process left in it."""
        if self._spool is None:
            return
        try:
            left = self._spool.open()
        except (OSError, SpoolLockedError) as e:
            raise ConfigError("[usage] spool_dir", f"{self._spool.directory}: {e}") from None
        metrics.USAGE_SPOOL_DEPTH.set(left)
        if left:
            _log.info(
                "replaying {count} usage events left in {path}", count=left, path=self._spool.path
            )
            self._schedule_drain(0)

    def stop(self) -> Deferred[None]:
        """Let in-flight writes finish, flush the spool while Redis takes it, close the spool."""
        d = Deferred.fromCoroutine(self._stop())
        d.addErrback(lambda f: _log.failure("stopping the usage recorder failed", f))
        return d

    async def _stop(self) -> None:
        self._stopping = True
        queued, self._queue = self._queue, []
        for event, done in queued:
            self._record_now(event).chainDeferred(done)
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        await self._settled()
        if self._spool is None:
            return
        deadline = self._clock.seconds() + _STOP_FLUSH_SECONDS
        while self._spool.depth and self._clock.seconds() < deadline:
            applied, attempted = await self._drain_batch()
            if applied < attempted:
                break
        if self._spool.depth:
            _log.warn(
                "{count} usage events stay in {path} for the next start",
                count=self._spool.depth,
                path=self._spool.path,
            )
        await self._spool.close()

    # Recording

    def record(self, event: UsageEvent) -> Deferred[None]:
        """Record ``event`` once; fires (never fails) when Redis has it or the spool has it on
        disk.

        The work starts after the reactor's next I/O pass, so what the caller sends right after
        this call, such as the ``done`` message itself, leaves first.
        """
        done: Deferred[None] = Deferred()
        done.addBoth(self._settle)
        self._inflight += 1
        if self._stopping:
            self._record_now(event).chainDeferred(done)
            return done
        self._queue.append((event, done))
        if len(self._queue) == 1:
            self._schedule_flush()
        return done

    def _schedule_flush(self) -> None:
        # A call scheduled from a timed call waits for the reactor's next round of timed calls,
        # and the reactor polls its sockets in between.
        self._clock.callLater(0, self._clock.callLater, 0, self._flush)

    def _flush(self) -> None:
        chunk, self._queue = self._queue[:_FLUSH_CHUNK], self._queue[_FLUSH_CHUNK:]
        if self._queue:
            self._schedule_flush()
        for event, done in chunk:
            self._record_now(event).chainDeferred(done)

    def _record_now(self, event: UsageEvent) -> Deferred[None]:
        try:
            record = UsageRecord.from_event(event, self._prices)
        except (ValueError, TypeError) as e:
            _EVENTS["failed"].inc()
            _log.error(
                "usage of query {query_id} not recorded: {reason}",
                query_id=str(event.query_id)[:128],
                reason=str(e),
            )
            return succeed(None)
        if self._spool is not None and (self._stopping or self._redis_ok is False):
            # Redis is known to fail: straight to disk, no timeout to wait for. Records go
            # to Redis again once it answers (a replay or a budget check); the backlog is
            # replayed behind them, in its own order.
            return self._to_spool(record)
        applied = self._apply(record).addCallbacks(
            self._applied,
            self._apply_failed,
            callbackArgs=(record, False),
            errbackArgs=(record,),
        )
        return applied.addErrback(self._unexpected, record)

    def _apply(self, record: UsageRecord, replay: bool = False) -> Deferred[str]:
        return maybeDeferred(
            self._store.apply,
            record,
            day_expiry(record.day, self._retention_days),
            month_expiry(record.month, self._retention_days),
            _REPLAY_TIMEOUT if replay else None,
        )

    def _applied(self, result: str, record: UsageRecord, replayed: bool) -> None:
        self._redis_state(True)
        if result == "recorded":
            _EVENTS["replayed" if replayed else "recorded"].inc()
            tokens, cost = self._metrics_for(record.agent)
            counts = (
                record.input_tokens,
                record.output_tokens,
                record.cache_read_tokens,
                record.cache_write_tokens,
            )
            for child, count in zip(tokens, counts, strict=True):
                if count:
                    child.inc(count)
            if record.cost:
                cost.inc(_usd(record.cost))
        elif result == "duplicate":
            _EVENTS["duplicate"].inc()
        else:
            _EVENTS["failed"].inc()
            _log.warn(
                "usage of query {query_id} ({day}) is older than the {days}-day retention; "
                "not recorded",
                query_id=record.query_id,
                day=record.day.isoformat(),
                days=self._retention_days,
            )

    def _metrics_for(self, agent: str) -> tuple[tuple[Any, ...], Any]:
        """The agent's token and cost counters (labels() is a lookup; once per agent)."""
        children = self._agent_metrics.get(agent)
        if children is None:
            tokens = tuple(metrics.TOKENS.labels(agent, kind) for kind in _TOKEN_KINDS)
            children = self._agent_metrics[agent] = (tokens, metrics.COST.labels(agent))
        return children

    def _apply_failed(self, failure: Failure, record: UsageRecord) -> Deferred[None] | Failure:
        if self._spool is None:
            return failure  # the in-memory store failing is a bug: logged, never retried
        self._redis_state(False, failure)
        return self._to_spool(record)

    def _unexpected(self, failure: Failure, record: UsageRecord) -> None:
        _EVENTS["failed"].inc()
        _log.failure(
            "recording usage failed: {line}", failure, line=record.to_line().decode().rstrip()
        )

    def _to_spool(self, record: UsageRecord) -> Deferred[None]:
        assert self._spool is not None
        written = self._spool.append(record)
        _EVENTS["spooled"].inc()
        metrics.USAGE_SPOOL_DEPTH.set(self._spool.depth)
        if not self._stopping:
            self._schedule_drain(self._backoff)
        return written

    def _redis_state(self, ok: bool, failure: Failure | None = None) -> None:
        if self._redis_ok is None or self._redis_ok is ok:
            return
        self._redis_ok = ok
        if ok:
            _log.info("usage store answers again")
        else:
            _log.warn(
                "usage store unavailable ({reason}); spooling usage to {path}",
                reason=failure.getErrorMessage() if failure else "unknown",
                path=self._spool.path if self._spool else "",
            )

    def _settle(self, result: object) -> None:
        self._inflight -= 1
        if not self._inflight:
            waiters, self._settled_waiters = self._settled_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _settled(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._inflight:
            self._settled_waiters.append(d)
        else:
            d.callback(None)
        return d

    # Replaying the spool

    def _schedule_drain(self, delay: float) -> None:
        if self._stopping or (self._drain_call is not None and self._drain_call.active()):
            return
        self._drain_call = self._clock.callLater(delay, self._drain)

    def _drain(self) -> None:
        self._drain_call = None
        if self._draining or self._stopping or self._spool is None or not self._spool.depth:
            return
        self._draining = True
        self._inflight += 1
        d = Deferred.fromCoroutine(self._drain_batch())
        d.addCallback(self._drained)
        d.addErrback(lambda f: _log.failure("replaying the usage spool failed", f))
        d.addBoth(self._drain_settled)

    async def _drain_batch(self) -> tuple[int, int]:
        """Apply the oldest spooled records in order; how many were applied, of how many."""
        assert self._spool is not None
        batch = self._spool.pending(_DRAIN_BATCH)
        results = await DeferredList([self._apply(r, True) for r in batch], consumeErrors=True)
        applied = 0
        for (ok, value), record in zip(results, batch, strict=True):
            if not ok:
                self._redis_state(False, cast(Failure, value))
                break
            self._applied(value, record, True)
            applied += 1
        self._spool.acknowledge(applied)
        metrics.USAGE_SPOOL_DEPTH.set(self._spool.depth)
        return applied, len(batch)

    def _drained(self, outcome: tuple[int, int]) -> None:
        assert self._spool is not None
        applied, attempted = outcome
        if not applied:
            self._backoff = min(self._backoff * 2, _BACKOFF_CAP)
            self._schedule_drain(self._backoff)
            return
        self._backoff = _BACKOFF_FIRST
        if self._spool.depth:
            # Progress: go on at once, or after a pause when part of the batch failed.
            self._schedule_drain(0 if applied == attempted else _BACKOFF_FIRST)

    def _drain_settled(self, result: object) -> None:
        self._draining = False
        self._settle(result)

    @property
    def spool_depth(self) -> int:
        return self._spool.depth if self._spool is not None else 0

    def health(self) -> dict[str, Any]:
        """``ok`` is false while Redis fails (usage goes to the spool) or the spool cannot be
        written; ``redis`` is None without Redis."""
        writable = self._spool is None or self._spool.writable
        return {
            "ok": self._redis_ok is not False and writable,
            "spool_depth": self.spool_depth,
            "spool_writable": writable,
            "redis": self._redis_ok,
        }

    # Budgets

    def check_budget(self, user: str, project: str) -> Deferred[BudgetDecision]:
        """Refuse when this month's operator-paid spend has reached the user's or the project's
        budget; allow when the store cannot say."""
        if self._redis_ok is False and self._clock.seconds() < self._budget_probe_at:
            # Known to fail: no prompt waits for its timeout; one check now and then probes.
            return succeed(BudgetDecision(True, None, None, 0.0))
        month = self.current_month()
        d = maybeDeferred(self._store.spend, user, project, month_days(month))
        decided = d.addCallbacks(
            self._decide, self._budget_unknown, callbackArgs=(user, project, month)
        )
        return decided.addErrback(self._budget_failed)

    def _decide(self, spend: MonthSpend, user: str, project: str, month: str) -> BudgetDecision:
        self._redis_state(True)
        scopes = (
            ("user", user, spend.user, self._budget(spend.user_budget, self._default_budget)),
            ("project", project, spend.project, self._budget(spend.project_budget, 0)),
        )
        for scope, subject, spent, budget in scopes:
            if budget and spent >= budget * self._soft_ratio:
                self._soft_warning(scope, subject, month, spent, budget)
        for scope, _, spent, budget in scopes:
            if budget and spent >= budget:
                return BudgetDecision(False, scope, _usd(budget), _usd(spent))
        budget = scopes[0][3]
        return BudgetDecision(True, None, _usd(budget) if budget else None, _usd(spend.user))

    def _budget(self, override: str | None, default: int) -> int:
        if override is None:
            return default
        try:
            return _budget_micro(float(override))
        except ValueError:
            _log.warn("ignoring budget override {value!r}: not a USD amount", value=override)
            return default

    def _budget_unknown(self, failure: Failure) -> BudgetDecision:
        self._redis_state(False, failure)
        self._budget_probe_at = self._clock.seconds() + _BACKOFF_FIRST
        return BudgetDecision(True, None, None, 0.0)

    def _budget_failed(self, failure: Failure) -> BudgetDecision:
        _log.failure("budget check failed; allowing the prompt", failure)
        return BudgetDecision(True, None, None, 0.0)

    def _soft_warning(self, scope: str, subject: str, month: str, spent: int, budget: int) -> None:
        if month != self._warned_month:
            self._warned_month, self._warned = month, set()
        marker = (scope, subject)
        if marker in self._warned:
            return
        self._warned.add(marker)
        # Once per month across restarts and agentd instances: the first to claim logs it.
        month_end = calendar.timegm(month_days(month)[-1].timetuple()) + _DAY_SECONDS
        ttl = max(1, int(month_end - self._now()) + _DAY_SECONDS)

        def claimed(first: bool) -> None:
            if first:
                metrics.BUDGET_SOFT_WARNINGS.labels(scope).inc()
                _log.warn(
                    "{scope} {subject} has spent {spent} USD of its {budget} USD budget for "
                    "{month}",
                    scope=scope,
                    subject=subject,
                    spent=_usd_text(spent),
                    budget=_usd_text(budget),
                    month=month,
                )

        d = maybeDeferred(self._store.claim, soft_warning_key(scope, subject, month), ttl)
        d.addCallbacks(claimed, lambda _: self._warned.discard(marker))

    def set_budget(self, scope: str, subject: str, usd: float | None) -> Deferred[None]:
        """Override the monthly budget of one user or project (0: none; None: the default)."""
        if scope not in SCOPES:
            raise ValueError("scope must be user or project")
        if not (USER_RE if scope == "user" else PROJECT_RE).fullmatch(subject):
            raise ValueError(f"invalid {scope} id")
        value = None if usd is None else repr(_budget_micro(usd) / MICRO_USD)
        return self._store.set_budget(budget_field(scope, subject), value)

    # Reading

    def current_month(self) -> str:
        return month_of(self._now())

    def report(self, scope: str, subject: str, month: str) -> Deferred[UsageReport]:
        """The month's report; fails when the store cannot be read."""
        return Deferred.fromCoroutine(read_report(self._store, scope, subject, month))


def _budget_micro(usd: float) -> int:
    if not math.isfinite(usd) or usd < 0:
        raise ValueError("a budget is a non-negative number of USD")
    return round(usd * MICRO_USD)


# --- agentd usage --------------------------------------------------------------------------


def usage_report_main(argv: list[str]) -> int:
    """``agentd usage --user U | --project P [--month YYYY-MM] [--config PATH] [--format F]``."""
    parser = argparse.ArgumentParser(
        prog="agentd usage", description="Print a user's or a project's monthly usage."
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="user id")
    who.add_argument("--project", help="project id")
    parser.add_argument("--month", help="YYYY-MM, UTC (default: this month)")
    parser.add_argument("--config", help="agentd.toml (default: embedded defaults + env)")
    parser.add_argument("--format", choices=("json", "csv"), default="json")
    args = parser.parse_args(argv)
    scope, subject = ("user", args.user) if args.user else ("project", args.project)
    if not (USER_RE if scope == "user" else PROJECT_RE).fullmatch(subject):
        parser.error(f"--{scope}: not a valid {scope} id")
    try:
        month = parse_month(args.month) if args.month else month_of(time.time())
    except ValueError as e:
        parser.error(f"--month: {e}")

    from twisted.internet import reactor

    try:
        config = load(args.config)
        if not config.redis.url:
            raise ConfigError(
                "[redis] url", "usage lives in Redis; without it only agentd's memory has it"
            )
        timeout = max(config.redis.timeout_ms / 1000, 5.0)
        store = RedisStore(config.redis.url, reactor, timeout=timeout)
    except (ConfigError, RedisURLError) as e:
        print(f"agentd usage: {e}", file=sys.stderr)
        return 2
    codes: list[int] = []

    async def run() -> int:
        try:
            report = await read_report(RedisUsageStore(store), scope, subject, month)
        except defer.TimeoutError:
            print(f"agentd usage: Redis did not answer within {timeout:g} s", file=sys.stderr)
            return 1
        except Exception as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            print(f"agentd usage: cannot read usage from Redis ({reason})", file=sys.stderr)
            return 1
        finally:
            await store.disconnect()
        _print_report(report, args.format, sys.stdout)
        return 0

    def finished(code: int) -> None:
        codes.append(code)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: Deferred.fromCoroutine(run()).addCallback(finished)
    )
    reactor.run()  # type: ignore[attr-defined]
    return codes[0] if codes else 1


def _print_report(report: UsageReport, fmt: str, out: TextIO) -> None:
    if fmt == "csv":
        out.write(report.as_csv())
    else:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    out.flush()
