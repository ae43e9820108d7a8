"""``agentd usage``: print a user's or a project's monthly usage from Redis, as JSON or CSV."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react

from agentd.config import PROJECT_RE, USER_RE, Config, ConfigError, load
from agentd.redisstore import RedisStore
from agentd.usage.budgets import Budgets
from agentd.usage.layout import month_of, parse_month
from agentd.usage.redis_store import RedisUsageStore
from agentd.usage.reports import UsageReport, read_report


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

    try:
        config = load(args.config)
        if not config.redis.configured:
            raise ConfigError(
                "[redis] url", "usage lives in Redis; without it only agentd's memory has it"
            )
    except ConfigError as e:
        print(f"agentd usage: {e}", file=sys.stderr)
        return 2
    react(_print_usage, (config, scope, subject, month, args.format))


async def _print_usage(
    reactor: IReactorTime, config: Config, scope: str, subject: str, month: str, fmt: str
) -> None:
    """Read the report and print it; the exit status says why when Redis cannot tell."""
    timeout = max(config.redis.timeout_ms / 1000, 5.0)
    try:
        store = RedisStore.from_config(config.redis, reactor, timeout=timeout)
    except ConfigError as e:
        print(f"agentd usage: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    usage_store = RedisUsageStore(store)
    budgets = Budgets(
        usage_store,
        None,
        monthly_budget_usd=config.usage.monthly_budget_usd,
        soft_budget_ratio=config.usage.soft_budget_ratio,
        now=time.time,
    )
    try:
        report = await read_report(usage_store, scope, subject, month, budgets)
    except defer.TimeoutError:
        print(f"agentd usage: Redis did not answer within {timeout:g} s", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as e:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        print(f"agentd usage: cannot read usage from Redis ({reason})", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        await store.disconnect()
    _print_report(report, fmt, sys.stdout)


def _print_report(report: UsageReport, fmt: str, out: TextIO) -> None:
    if fmt == "csv":
        out.write(report.as_csv())
    else:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    out.flush()
