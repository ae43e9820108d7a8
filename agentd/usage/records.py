"""Usage records: the agent's usage object read as an event, validated and priced once.

A ``UsageEvent`` is what the gateway knows when a query ends; a ``UsageRecord`` is that event
validated, with its cost in integer micro-dollars (the agent's reported cost, else priced from
the price table). The record's JSON line is both the spool's format and the query's marker in
Redis.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from agentd.config import AGENT_NAME_RE, PROJECT_RE, USER_RE
from agentd.pricing import PriceTable
from agentd.usage.layout import (
    month_name,
    project_day_key,
    project_month_total_key,
    project_users_key,
    query_key,
    user_day_key,
    user_month_total_key,
    user_project_day_key,
    user_projects_key,
    utc_day,
)

MICRO_USD = 1_000_000
# Far beyond any real query; they keep a buggy or hostile agent from poisoning a bill.
MAX_TOKENS = 10**9
MAX_COST_USD = 100_000.0

KEY_SOURCES = ("operator", "user")
OUTCOMES = ("done", "aborted", "error")
COST_SOURCES = ("reported", "priced", "unpriced")

_QUERY_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_MODEL_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_AGENT_FIELDS = frozenset(
    ("inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens", "cost")
)


# Records and events are values: nothing changes one once it is made. They are not frozen
# dataclasses all the same: a frozen dataclass sets each field through object.__setattr__,
# which made building the two of every query four times dearer.
@dataclass(slots=True)
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
        if not isinstance(usage, dict) or _AGENT_FIELDS.isdisjoint(usage):
            return None
        get = usage.get
        try:
            input_tokens = _token_count(get("inputTokens"))
            output_tokens = _token_count(get("outputTokens"))
            cache_read_tokens = _token_count(get("cacheReadTokens"))
            cache_write_tokens = _token_count(get("cacheWriteTokens"))
            cost = get("cost")
            if cost is not None:
                _micro_usd(cost)
        except ValueError:
            return None
        model = get("model")
        model = agent if model is None else model
        if not isinstance(model, str) or not _MODEL_RE.fullmatch(model):
            return None
        return cls(
            query_id=query_id,
            user=user,
            project=project,
            agent=agent,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read_tokens,
            cache_write_tokens=cache_write_tokens,
            reported_cost=None if cost is None else float(cost),
            timestamp=timestamp,
            key_source=key_source,
            outcome=outcome,
        )


def _token_count(value: Any) -> int:
    """An agent's token count: null is 0, integral floats are accepted."""
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    _check_count("token count", value)
    return int(value)


def _check_count(name: str, value: Any) -> None:
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:  # bool is not int here
        raise ValueError(f"{name} must be an integer from 0 to {MAX_TOKENS}")


def _check_text(name: str, value: Any, pattern: re.Pattern[str]) -> None:
    if type(value) is not str or not pattern.fullmatch(value):
        raise ValueError(f"invalid {name}")


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


def usd(micro: int) -> float:
    """Micro-dollars as USD, for JSON and metrics."""
    return micro / MICRO_USD


def usd_text(micro: int) -> str:
    """Exact decimal USD: micro-dollars are integers, so no float rounding shows."""
    return f"{micro // MICRO_USD}.{micro % MICRO_USD:06d}"


@dataclass(slots=True)
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

    # The UTC day and month of ``timestamp``, set with the record: every record's keys and
    # expiries need both (a cached_property takes a lock on first use in Python 3.11).
    day: datetime.date = field(init=False, repr=False, compare=False)
    month: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Spelled out: a loop over the fields by name took twice as long, for every record.
        _check_text("query_id", self.query_id, _QUERY_ID_RE)
        _check_text("user", self.user, USER_RE)
        _check_text("project", self.project, PROJECT_RE)
        _check_text("agent", self.agent, AGENT_NAME_RE)
        _check_text("model", self.model, _MODEL_RE)
        _check_timestamp(self.timestamp)
        _check_count("input_tokens", self.input_tokens)
        _check_count("output_tokens", self.output_tokens)
        _check_count("cache_read_tokens", self.cache_read_tokens)
        _check_count("cache_write_tokens", self.cache_write_tokens)
        if type(self.cost) is not int:
            raise ValueError("cost must be integer micro-dollars")
        if not 0 <= self.cost <= MAX_COST_USD * MICRO_USD:
            raise ValueError("cost out of range")
        if self.cost_source not in COST_SOURCES:
            raise ValueError(f"cost_source must be one of {', '.join(COST_SOURCES)}")
        if self.key_source not in KEY_SOURCES:
            raise ValueError(f"key_source must be one of {', '.join(KEY_SOURCES)}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
        self.day = day = utc_day(self.timestamp)
        self.month = month_name(day)

    @classmethod
    def from_event(cls, event: UsageEvent, prices: PriceTable) -> UsageRecord:
        """Validate and price ``event`` (ValueError when it cannot be recorded)."""
        if event.reported_cost is not None:
            cost, source = _micro_usd(event.reported_cost), "reported"
        else:
            # Pricing needs a day and the counts: checked first (the record checks the rest).
            _check_timestamp(event.timestamp)
            tokens = (
                event.input_tokens,
                event.output_tokens,
                event.cache_read_tokens,
                event.cache_write_tokens,
            )
            for count in tokens:
                _check_count("token count", count)
            priced = prices.cost(event.model, *tokens, on=utc_day(event.timestamp))
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

    def counters(self) -> dict[str, int]:
        """This query's increments to every day hash it touches, in ``COUNTER_FIELDS``'s
        order."""
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
        # Spelled out, in _RECORD_FIELDS's order (a test holds it): a getattr per field took
        # three times as long, for every record.
        data = {
            "v": 1,
            "query_id": self.query_id,
            "user": self.user,
            "project": self.project,
            "agent": self.agent,
            "model": self.model,
            "timestamp": self.timestamp,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cost": self.cost,
            "cost_source": self.cost_source,
            "key_source": self.key_source,
            "outcome": self.outcome,
        }
        return orjson.dumps(data, option=orjson.OPT_APPEND_NEWLINE)

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
        return [query_key(self.query_id), *_totals_keys(self.user, self.project, self.day)]


# A user's queries in a project on one day all add to the same totals.
@functools.lru_cache(maxsize=256)
def _totals_keys(user: str, project: str, day: datetime.date) -> tuple[str, ...]:
    month = month_name(day)
    return (
        user_day_key(user, day),
        project_day_key(project, day),
        user_project_day_key(user, project, day),
        user_projects_key(user, month),
        project_users_key(project, month),
        user_month_total_key(user, month),
        project_month_total_key(project, month),
    )


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord) if f.init)
