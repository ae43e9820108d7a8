"""The usage keys in Redis: one Lua script applies records, one reads a month's spend."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, FirstError
from twisted.python.failure import Failure

from agentd.redisconfirm import Witness
from agentd.redishealth import write_probe
from agentd.redisstore import RedisStore
from agentd.usage.layout import (
    BUDGETS_KEY,
    COUNTER_FIELDS,
    budget_field,
    month_name,
    month_total_expiry,
    project_day_key,
    project_month_total_key,
    query_key,
    user_day_key,
    user_month_total_key,
)
from agentd.usage.records import UsageRecord
from agentd.usage.store import MonthSpend

# Reports read a whole month at once: they may take longer than a record's write.
_READ_TIMEOUT = 2.0

# Records waiting together are applied in one call, with the effect of applying each alone.
# Per record, 8 keys and 6 arguments, in record order:
# KEYS      the query's record (the "already recorded" marker); the user's, the project's and
#           the user-in-project day hashes; the month's index sets (the user's projects, the
#           project's users); the user's and the project's month-to-date operator-paid totals
# ARGV      day expiry, month expiry (UNIX seconds), user, project, the record (a JSON line),
#           the increments of the counters in the table below, in its order, comma-separated
#           (a zero increment is skipped: a counter never incremented reads as 0; so is
#           a month total's, when the operator paid nothing)
# Returns   per record, 0: duplicate (nothing written), 2: older than retention (nothing
#           written), or 1: recorded. A record repeated in one call is a duplicate the
#           second time. Integer replies, because txredisapi parses those in bulk and bulk
#           strings one per turn.
# The records' increments are summed per key and counter first, then written: one HINCRBY
# per counter of each day hash, one SADD per member of each set and one EXPIREAT per key,
# however many records share them (the script's calls, not the commands, are most of its
# time). Sums stay exact: Lua numbers are doubles, and they stay below 2^53. The markers are
# written after the increments, never before.
# A missing month total stays missing: only the budget check can rebuild it from the whole
# month's day hashes, and until then an increment alone would undercount.
APPLY_SCRIPT = """
local counters = {COUNTERS}
local now = tonumber(redis.call('TIME')[1])
local results = {}
-- What the call's records write, per key in first-use order: a day hash's sums by counter,
-- a set's members, the latest expiry; and the month totals' sums (false: total missing).
local order, expiry, sums, members, totals = {}, {}, {}, {}, {}
local taken, recorded = {}, {}
local function entry(entries, key, expire_at)
  local found = entries[key]
  if found == nil then
    found = {}
    entries[key] = found
    order[#order + 1] = key
    expiry[key] = expire_at
  elseif expire_at > expiry[key] then
    expiry[key] = expire_at
  end
  return found
end
for r = 0, #KEYS / 8 - 1 do
  local k, a = 8 * r, 6 * r
  local day_expiry = tonumber(ARGV[a + 1])
  local result = 1
  if taken[KEYS[k + 1]] or redis.call('EXISTS', KEYS[k + 1]) == 1 then
    result = 0
  elseif day_expiry <= now then
    result = 2
  else
    local increments = {}
    for increment in string.gmatch(ARGV[a + 6], '[^,]+') do
      increments[#increments + 1] = increment
    end
    for i = k + 2, k + 4 do
      local sum = entry(sums, KEYS[i], day_expiry)
      for j = 1, #counters do
        if increments[j] ~= '0' then
          sum[j] = (sum[j] or 0) + tonumber(increments[j])
        end
      end
    end
    local month_expiry = tonumber(ARGV[a + 2])
    entry(members, KEYS[k + 5], month_expiry)[ARGV[a + 4]] = true
    entry(members, KEYS[k + 6], month_expiry)[ARGV[a + 3]] = true
    local operator = increments[1] - increments[2]
    if operator ~= 0 then
      for i = k + 7, k + 8 do
        local key = KEYS[i]
        if totals[key] == nil then
          totals[key] = redis.call('EXISTS', key) == 1 and 0
        end
        if totals[key] then
          totals[key] = totals[key] + operator
        end
      end
    end
    taken[KEYS[k + 1]] = true
    recorded[#recorded + 1] = r
  end
  results[r + 1] = result
end
for _, key in ipairs(order) do
  if members[key] then
    for member in pairs(members[key]) do
      redis.call('SADD', key, member)
    end
  else
    for j, sum in pairs(sums[key]) do
      redis.call('HINCRBY', key, counters[j], string.format('%d', sum))
    end
  end
  redis.call('EXPIREAT', key, expiry[key])
end
for key, total in pairs(totals) do
  if total and total ~= 0 then
    redis.call('INCRBY', key, string.format('%d', total))
  end
end
for _, r in ipairs(recorded) do
  redis.call('SET', KEYS[8 * r + 1], ARGV[6 * r + 5])
  redis.call('EXPIREAT', KEYS[8 * r + 1], ARGV[6 * r + 1])
end
return results
""".replace("{COUNTERS}", "{" + ", ".join(f"'{name}'" for name in COUNTER_FIELDS) + "}")
_APPLY_RESULTS = {0: "duplicate", 1: "recorded", 2: "expired"}

# KEYS[1]   the budget overrides hash
# KEYS[2-3] the user's and the project's month-to-date totals
# ARGV      the user's and the project's override fields
# Returns   {user spend, project spend, user override, project override}: spend is what the
#           operator paid, in micro-dollars, or -1 when that total is missing.
SPEND_SCRIPT = """
local user = redis.call('GET', KEYS[2])
local project = redis.call('GET', KEYS[3])
local budgets = redis.call('HMGET', KEYS[1], ARGV[1], ARGV[2])
return {tonumber(user) or -1, tonumber(project) or -1, budgets[1], budgets[2]}
"""

# KEYS[1-2] the user's and the project's month-to-date totals
# KEYS[3..] N user day hashes, then N project day hashes
# ARGV      N, the totals' expiry (UNIX seconds)
# Returns   {user spend, project spend}. A total still missing is set to the sum of its day
#           hashes; atomic with recording, so no record lands between the sum and the SET.
#           Sums are exact: Lua numbers are doubles, and they stay below 2^53.
REBUILD_SCRIPT = """
local n = tonumber(ARGV[1])
local function total(key, first)
  local value = redis.call('GET', key)
  if value then
    return tonumber(value)
  end
  local sum = 0
  for i = first, first + n - 1 do
    local v = redis.call('HMGET', KEYS[i], 'cost', 'cost_user_key')
    sum = sum + (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0)
  end
  redis.call('SET', key, string.format('%d', sum))
  redis.call('EXPIREAT', key, ARGV[2])
  return sum
end
return {total(KEYS[1], 3), total(KEYS[2], n + 3)}
"""


def _apply_arguments(record: UsageRecord, expire_at: int, month_expire_at: int) -> list[Any]:
    # Few arguments: txredisapi encodes each one in Python, the dearest part of a record.
    increments = ",".join(map(str, record.counters().values()))  # in COUNTER_FIELDS's order
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
    """The usage keys in Redis: one script for the records waiting together, one per budget
    check (two when a month total is rebuilt), pipelined reads."""

    def __init__(self, redis: RedisStore) -> None:
        self._redis = redis

    def apply(
        self,
        record: UsageRecord,
        expire_at: int,
        month_expire_at: int,
        timeout: float | None = None,
    ) -> Deferred[str]:
        d = self.apply_all([(record, expire_at, month_expire_at)], timeout)
        return d.addCallback(lambda results: results[0])

    def apply_all(
        self, items: Sequence[tuple[UsageRecord, int, int]], timeout: float | None = None
    ) -> Deferred[list[str]]:
        keys: list[str] = []
        args: list[Any] = []
        for record, expire_at, month_expire_at in items:
            keys += record.keys()
            args += _apply_arguments(record, expire_at, month_expire_at)
        d = self._redis.eval("usage_record", APPLY_SCRIPT, keys, args, timeout)
        return d.addCallback(lambda replies: [_APPLY_RESULTS[int(reply)] for reply in replies])

    def confirm(self, records: Sequence[UsageRecord]) -> Deferred[list[bool]]:
        """Wait for a replica to have each record: its marker stands for its whole part of
        the script."""
        return self._redis.confirm_all([Witness.key_exists(query_key(r.query_id)) for r in records])

    def spend(self, user: str, project: str, days: Sequence[datetime.date]) -> Deferred[MonthSpend]:
        month = month_name(days[0])
        totals = [user_month_total_key(user, month), project_month_total_key(project, month)]
        keys = [BUDGETS_KEY, *totals]
        args = [budget_field("user", user), budget_field("project", project)]
        d = self._redis.eval("usage_budget", SPEND_SCRIPT, keys, args)

        def parsed(reply: list[Any]) -> MonthSpend | Deferred[MonthSpend]:
            user_budget, project_budget = _text(reply[2]), _text(reply[3])
            if int(reply[0]) >= 0 and int(reply[1]) >= 0:
                return MonthSpend(int(reply[0]), int(reply[1]), user_budget, project_budget)
            keys = [*totals]
            keys += [user_day_key(user, day) for day in days]
            keys += [project_day_key(project, day) for day in days]
            args = [len(days), month_total_expiry(month)]
            rebuilt = self._redis.eval("usage_budget_rebuild", REBUILD_SCRIPT, keys, args)
            return rebuilt.addCallback(
                lambda spent: MonthSpend(int(spent[0]), int(spent[1]), user_budget, project_budget)
            )

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

    def budget(self, field: str) -> Deferred[str | None]:
        d = self._redis.call("usage_read", lambda c: c.hget(BUDGETS_KEY, field))
        return d.addCallback(_text)

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

    def probe(self) -> Deferred[Any]:
        return write_probe(self._redis)
