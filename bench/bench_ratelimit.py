"""Rate-limit checks per second and the latency a check adds, against a Redis GET as the floor.

Starts its own redis-server on a free loopback port. Each run measures, from this one process
and through the same connection pool:

- closed-loop throughput (``--concurrency`` calls in flight for ``--seconds``) of prompt checks
  and of the floors, with the latency of every call under that load;
- unloaded latency, one call at a time, checks and floors interleaved;
- Redis commands per check, from ``INFO commandstats`` (one EVALSHA is one round trip).

The floors are a plain GET and an EXISTS on the same key. Both are one round trip; they differ in
the client: txredisapi hands over at most one bulk-string reply (GET's) per connection per
reactor turn, while integer replies (EXISTS's and the limiter script's) are parsed in one go.

Checks go to a new user every time (the write path, the costlier one). The report gives every
run and the median of each figure over the runs. ``--smoke`` is a quick pass for the test suite.

    .venv/bin/python bench/bench_ratelimit.py --out ratelimit.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.interfaces import IReactorTime  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from agentd.config import RateLimitConfig, RedisConfig  # noqa: E402
from agentd.ratelimit import RateLimiter  # noqa: E402
from agentd.redisstore import RedisStore  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

FLOOR_KEY = "bench:floor"
VOID = (
    "a Redis call timed out or failed, so the limiter fell back to in-process limits and the "
    "results are void (a busy machine? try again, or raise --timeout-ms)"
)


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 and p99 in microseconds."""
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)

    return {"p50": at(0.50), "p99": at(0.99)}


async def closed_loop(
    reactor: IReactorTime,
    issue: Callable[[int], defer.Deferred[Any]],
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    """Keep ``concurrency`` calls in flight for ``seconds``; count them and time each.

    Each of the ``concurrency`` lanes issues its next call when the last one is answered,
    until the deadline; the measurement ends when every lane has.
    """
    finished: defer.Deferred[None] = defer.Deferred()
    latencies: list[float] = []
    state = {"issued": 0, "lanes": concurrency, "failed": 0, "issuing": False}
    started = time.perf_counter()
    deadline = started + seconds

    def launch() -> None:
        n = state["issued"]
        state["issued"] += 1
        state["issuing"] = True
        sent = time.perf_counter()
        issue(n).addBoth(done, sent)
        state["issuing"] = False

    def done(result: object, sent: float) -> None:
        now = time.perf_counter()
        latencies.append(now - sent)
        if isinstance(result, Failure):
            state["failed"] += 1
        if now < deadline:
            # A call answered synchronously must not recurse into the next one.
            if state["issuing"]:
                reactor.callLater(0, launch)
            else:
                launch()
            return
        state["lanes"] -= 1
        if state["lanes"] == 0:
            finished.callback(None)

    for _ in range(concurrency):
        launch()
    await finished
    elapsed = time.perf_counter() - started
    return {
        "calls": len(latencies),
        "failed": state["failed"],
        "per_second": round(len(latencies) / elapsed),
        "latency_us": percentiles(latencies),
    }


def command_calls(server: RedisServer) -> dict[str, int]:
    calls = {}
    for line in server.cli("info", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, stats = line.split(":", 1)
            fields = dict(part.split("=") for part in stats.strip().split(","))
            calls[name.removeprefix("cmdstat_")] = int(fields["calls"])
    return calls


async def one_run(
    reactor: IReactorTime, server: RedisServer, args: argparse.Namespace, run: int
) -> dict[str, Any]:
    server.cli("flushall")
    store = RedisStore(server.url, reactor, timeout=args.timeout_ms / 1000)
    limiter = RateLimiter.from_config(RateLimitConfig(), store, reactor)
    try:
        await store.call("set", lambda c: c.set(FLOOR_KEY, "x" * 16))
        for n in range(200):  # connect the whole pool and load the script on it
            await limiter.check_prompt(f"warmup{n}")

        def check(n: int) -> defer.Deferred[Any]:
            return limiter.check_prompt(f"r{run}u{n}")

        def check_alone(n: int) -> defer.Deferred[Any]:
            return limiter.check_prompt(f"r{run}s{n}")

        def get(n: int) -> defer.Deferred[Any]:
            return store.call("get", lambda c: c.get(FLOOR_KEY))

        def exists(n: int) -> defer.Deferred[Any]:
            return store.call("exists", lambda c: c.exists(FLOOR_KEY))

        server.cli("config", "resetstat")
        checks = await closed_loop(reactor, check, args.concurrency, args.seconds)
        calls = command_calls(server)
        scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
        if limiter.degraded or checks["failed"]:
            raise SystemExit(VOID)
        floors = {
            name: await closed_loop(reactor, issue, args.concurrency, args.seconds)
            for name, issue in (("get", get), ("exists", exists))
        }

        alone: dict[str, list[float]] = {"check": [], "get": [], "exists": []}
        for n in range(args.samples):
            for name, issue in (("check", check_alone), ("get", get), ("exists", exists)):
                sent = time.perf_counter()
                await issue(n)
                alone[name].append(time.perf_counter() - sent)
        if limiter.degraded:
            raise SystemExit(VOID)
    finally:
        limiter.stop()
        await store.disconnect()
    return {
        "checks_per_second": checks["per_second"],
        "gets_per_second": floors["get"]["per_second"],
        "exists_per_second": floors["exists"]["per_second"],
        "check_latency_us": percentiles(alone["check"]),
        "get_latency_us": percentiles(alone["get"]),
        "exists_latency_us": percentiles(alone["exists"]),
        "loaded_check_latency_us": checks["latency_us"],
        "loaded_get_latency_us": floors["get"]["latency_us"],
        "loaded_exists_latency_us": floors["exists"]["latency_us"],
        "redis_commands_per_check": round(scripts / checks["calls"], 3),
    }


async def in_process_rate(reactor: IReactorTime, seconds: float) -> int:
    """Checks per second of the in-process limiter alone (the embedded default, the fallback)."""
    limiter = RateLimiter.from_config(RateLimitConfig(), None, reactor)
    count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(1000):
            limiter.check_prompt(f"u{count}")
            count += 1
    return round(count / (time.perf_counter() - started))


async def bytes_per_active_user(reactor: IReactorTime, server: RedisServer) -> int:
    """Redis memory for a user with a full log at the default 60 prompts per minute."""
    store = RedisStore(server.url, reactor, timeout=1.0)
    limiter = RateLimiter.from_config(RateLimitConfig(), store, reactor)
    try:
        for _ in range(60):
            await limiter.check_prompt("active")
        usage = await store.call(
            "memory", lambda c: c.execute_command("MEMORY", "USAGE", "rl:{active}:prompts")
        )
    finally:
        limiter.stop()
        await store.disconnect()
    return int(usage)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    median: dict[str, Any] = {}
    for name, value in runs[0].items():
        if isinstance(value, dict):
            median[name] = {q: statistics.median(run[name][q] for run in runs) for q in value}
        else:
            median[name] = statistics.median(run[name] for run in runs)
    return median


async def main(reactor: IReactorTime, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            version = server.cli("info", "server").split("redis_version:")[1].split()[0]
            runs = [await one_run(reactor, server, args, n) for n in range(args.runs)]
            memory = await bytes_per_active_user(reactor, server)
        finally:
            server.stop()
    report: dict[str, Any] = {
        "settings": {
            "runs": args.runs,
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "samples": args.samples,
            "timeout_ms": args.timeout_ms,
            "redis_version": version,
            "python": sys.version.split()[0],
        },
        "median": median_of(runs),
        "runs": runs,
        "redis_bytes_per_active_user": memory,
        "in_process_checks_per_second": await in_process_rate(reactor, min(args.seconds, 1.0)),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    m = report["median"]
    print(f"median of {args.runs} run(s), {args.concurrency} in flight, Redis {version}")
    print(f"{'':12}{'per second':>12}{'p50 us':>10}{'p99 us':>10}{'loaded p50':>12}{'p99':>10}")
    for label, prefix, rate in (
        ("check", "check", "checks_per_second"),
        ("GET", "get", "gets_per_second"),
        ("EXISTS", "exists", "exists_per_second"),
    ):
        alone, loaded = m[f"{prefix}_latency_us"], m[f"loaded_{prefix}_latency_us"]
        print(
            f"{label:12}{m[rate]:>12.0f}{alone['p50']:>10.1f}{alone['p99']:>10.1f}"
            f"{loaded['p50']:>12.1f}{loaded['p99']:>10.1f}"
        )
    print(f"Redis commands per check: {m['redis_commands_per_check']}")
    print(f"Redis bytes per active user at 60/min: {memory}")
    print(f"in-process checks per second: {report['in_process_checks_per_second']}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--smoke", action="store_true", help="one short run, for the test suite")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2000, help="unloaded latency samples")
    parser.add_argument(
        "--timeout-ms",
        type=int,
        default=RedisConfig().timeout_ms,
        help="Redis call timeout (default: agentd's, [redis] timeout_ms)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        # A smoke run checks that everything works, not how fast: a busy machine must not
        # fail it by pushing a call past agentd's tight production timeout.
        args.runs, args.seconds, args.samples, args.timeout_ms = 1, 0.3, 200, 1000
    return args


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
