"""Where usage lives in Redis: UTC days and months, the key of each counter, and expiry.

Every key carries the hash tag {usage}: the recording script touches a query's marker, three
day hashes and two index sets at once, and one slot is the only way those stay one atomic
step on a Redis Cluster. docs/usage.md describes the layout and retention.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import re

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

DAY_SECONDS = 86_400
_EPOCH = datetime.date(1970, 1, 1)
# ASCII digits: a str pattern's \d also matches the digits of other scripts.
_MONTH_RE = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")


# --- Months, days and expiry (all UTC) ---------------------------------------------------


def parse_month(text: str) -> str:
    """``YYYY-MM`` from 1970-01 to 9999-12, or ValueError."""
    match = _MONTH_RE.fullmatch(text)
    if match is None or int(match.group(1)) < 1970:
        raise ValueError("month must be YYYY-MM")
    return text


def month_of(timestamp: float) -> str:
    return month_name(utc_day(timestamp))


# Every prompt's budget check and usage record asks about the current day and month:
# the answers are kept for the few days and months in use.
@functools.lru_cache(maxsize=8)
def month_days(month: str) -> tuple[datetime.date, ...]:
    year, number = int(month[:4]), int(month[5:7])
    days = calendar.monthrange(year, number)[1]
    return tuple(datetime.date(year, number, day) for day in range(1, days + 1))


@functools.lru_cache(maxsize=16)
def day_expiry(day: datetime.date, retention_days: int) -> int:
    """When a day's keys expire: ``retention_days`` full days after the day ends."""
    return calendar.timegm(day.timetuple()) + (retention_days + 1) * DAY_SECONDS


@functools.lru_cache(maxsize=16)
def month_expiry(month: str, retention_days: int) -> int:
    """When a month's index sets expire: with the month's last day."""
    return day_expiry(month_days(month)[-1], retention_days)


def month_total_expiry(month: str) -> int:
    """When a month-to-date total expires: a day after the month ends. Only budget checks of
    the current month read it; reports sum the day keys."""
    return calendar.timegm(month_days(month)[-1].timetuple()) + 2 * DAY_SECONDS


def utc_day(timestamp: float) -> datetime.date:
    """The UTC date of a UNIX timestamp: usage days and months are UTC."""
    return _day(int(timestamp // DAY_SECONDS))


@functools.lru_cache(maxsize=8)
def _day(number: int) -> datetime.date:
    """Day ``number`` since 1970-01-01 (UNIX time has no leap seconds: each day is 86,400)."""
    return _EPOCH + datetime.timedelta(days=number)


@functools.lru_cache(maxsize=8)
def month_name(day: datetime.date) -> str:
    """``YYYY-MM`` of ``day``."""
    return f"{day.year:04d}-{day.month:02d}"


# --- Key layout (docs/usage.md) ------------------------------------------------------------


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


def user_month_total_key(user: str, month: str) -> str:
    return f"{KEY_PREFIX}:month:user:{user}:{month}"


def project_month_total_key(project: str, month: str) -> str:
    return f"{KEY_PREFIX}:month:project:{project}:{month}"


def query_key(query_id: str) -> str:
    return f"{KEY_PREFIX}:query:{query_id}"


def soft_warning_key(scope: str, subject: str, month: str) -> str:
    return f"{KEY_PREFIX}:soft-warning:{scope}:{subject}:{month}"


def budget_field(scope: str, subject: str) -> str:
    return f"{scope}:{subject}"
