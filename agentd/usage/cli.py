"""``agentd usage``: print a user's or a project's monthly usage from Redis, as JSON or CSV."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from twisted.internet import defer
from twisted.internet.defer import Deferred

from agentd.config import PROJECT_RE, USER_RE, ConfigError, load
from agentd.redisstore import RedisStore, RedisURLError
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
