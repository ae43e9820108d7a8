"""What caps rate-limit checks per second from one process, and what would lift the cap.

``bench_ratelimit.py`` measures the limiter as agentd runs it. This one measures, in the same
process against the same redis-server, interleaved run by run, the same closed loop of
prompt checks (``RateLimiter.check_prompt``, new user each time, ``--concurrency`` in flight)
four ways, to attribute the cost:

- ``as-is``: agentd's limiter through ``RedisStore`` and txredisapi, as in production;
- ``library-fixed``: the same, with three changes to txredisapi applied for the run only
  (what a fix upstream would give): ``eval`` remembers each script's SHA-1 instead of
  encoding and hashing the script text on every call; the pool hands out a ready connection
  without running a generator (``getConnection`` is an ``inlineCallbacks`` function); and a
  command without a reply timeout waits on one Deferred instead of three;
- ``pipeline``: a thin pipeline in front of txredisapi, as agentd could have one: the checks
  issued in one reactor turn are written to Redis at once with txredisapi's own ``pipeline``
  (one ``EVALSHA`` each, so the script and its atomicity per user are unchanged), with one
  timeout and one latency observation for the batch instead of one per check;
- ``pipeline+fixed``: both.

Also the floor: a plain ``GET`` through ``RedisStore`` as is. Each figure is checks per second
and the CPU this process spent per check (the loop is CPU-bound in this process: Redis
answers a script like this in a few microseconds). Run one variant alone under py-spy to see
where its time goes:

    .venv/bin/python bench/ratelimit_ceiling.py --out ceiling.json
    py-spy record -r 500 -f raw -o as-is.txt -- .venv/bin/python bench/ratelimit_ceiling.py \
        --only as-is --runs 1 --seconds 10
    .venv/bin/python -m bench.profiles as-is.txt --inside mainLoop
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import txredisapi  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.interfaces import IReactorTime  # noqa: E402

from agentd import metrics  # noqa: E402
from agentd.config import RateLimitConfig  # noqa: E402
from agentd.ratelimit import SCRIPT, RateLimiter, ScriptRunner  # noqa: E402
from agentd.redisstore import RedisStore  # noqa: E402
from bench.bench_ratelimit import FLOOR_KEY, VOID, closed_loop  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

VARIANTS = ("as-is", "library-fixed", "pipeline", "pipeline+fixed")


@contextlib.contextmanager
def library_fixed() -> Iterator[None]:
    """txredisapi with the three changes described above, for the duration of the block."""
    protocol = txredisapi.BaseRedisProtocol
    factory = txredisapi.RedisFactory
    originals = (protocol.eval, protocol.execute_command, factory.getConnection)
    _, original_execute, original_get = originals
    hashes: dict[object, tuple[bytes, str]] = {}

    def fixed_eval(
        self: Any, script: str | bytes, keys: Sequence[Any] = (), args: Sequence[Any] = ()
    ) -> Deferred[Any]:
        known = hashes.get(script)
        if known is None:
            text = script.encode() if isinstance(script, str) else script
            known = hashes[script] = (text, hashlib.sha1(text).hexdigest())
        text, sha = known
        if sha in self.script_hashes:
            called: Deferred[Any] = self.evalsha(sha, keys, args)
            return called.addErrback(self._evalsha_failed, text, sha, keys, args)
        loaded: Deferred[Any] = self._eval(text, sha, keys, args)
        return loaded

    def execute_command(self: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if kwargs or self.replyTimeout or self.pipelining or self.inMulti or not self.connected:
            result: Deferred[Any] = original_execute(self, *args, **kwargs)
            return result
        self.transport.write(self._build_command(*args))
        reply: Deferred[Any] = self.replyQueue.get()
        return reply.addCallback(self.handle_reply)

    def get_connection(self: Any, peek: bool = False) -> Deferred[Any]:
        ready = self.connectionQueue.pending
        if peek and ready:
            connection = random.choice(ready)
            if connection.connected:
                return defer.succeed(connection)
        result: Deferred[Any] = original_get(self, peek)
        return result

    protocol.eval = fixed_eval
    protocol.execute_command = execute_command
    factory.getConnection = get_connection
    try:
        yield
    finally:
        protocol.eval, protocol.execute_command, factory.getConnection = originals


class TurnPipeline:
    """A ``ScriptRunner`` that writes the scripts called in one reactor turn to Redis at once.

    Each call still is one ``EVALSHA`` with its own keys and reply; what is shared per batch
    is the write, the pool's connection, the timeout and the latency observation.
    """

    def __init__(self, store: RedisStore, reactor: IReactorTime) -> None:
        self._store = store
        self._reactor = reactor
        self._pending: list[tuple[str, Sequence[str], Sequence[Any], Deferred[Any]]] = []
        self._sha: dict[str, str] = {}

    def eval(
        self, operation: str, script: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Deferred[Any]:
        if script not in self._sha:
            # Loading is rare (once per script); keep it out of the batching.
            self._sha[script] = hashlib.sha1(script.encode()).hexdigest()
        result: Deferred[Any] = Deferred()
        if not self._pending:
            self._reactor.callLater(0, self._flush)
        self._pending.append((script, keys, args, result))
        return result

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        started = time.perf_counter()

        def send(pipe: Any) -> Deferred[Any]:
            for script, keys, args, result in batch:
                pipe.evalsha(self._sha[script], list(keys), list(args)).chainDeferred(result)
            sent: Deferred[Any] = pipe.execute_pipeline()
            return sent

        def observed(outcome: object) -> None:
            metrics.REDIS_LATENCY.labels("ratelimit_batch").observe(time.perf_counter() - started)

        def failed(failure: Any) -> None:
            for *_, result in batch:
                if not result.called:
                    result.errback(failure)

        d: Deferred[Any] = self._store.connection.pipeline()
        d.addCallback(send)
        d.addTimeout(self._store.timeout, self._reactor)
        d.addCallbacks(observed, failed)


async def load_script(store: RedisStore) -> None:
    """Every variant calls EVALSHA first; the pipeline has no NOSCRIPT fallback."""
    await store.call("load", lambda c: c.script_load(SCRIPT))


async def one_variant(
    reactor: IReactorTime,
    server: RedisServer,
    args: argparse.Namespace,
    variant: str,
    run: int,
) -> dict[str, Any]:
    store = RedisStore(server.url, reactor, timeout=args.timeout_ms / 1000)
    runner: ScriptRunner = TurnPipeline(store, reactor) if "pipeline" in variant else store
    # agentd's default limits, as RateLimiter.from_config builds them, over either runner.
    defaults = RateLimiter.from_config(RateLimitConfig(), None, reactor)
    limiter = RateLimiter(defaults.prompts, defaults.prompts, runner, reactor)
    fixed = library_fixed() if "fixed" in variant else contextlib.nullcontext()
    try:
        with fixed:
            await load_script(store)
            for n in range(200):  # connect the whole pool
                await limiter.check_prompt(f"warm{variant}{n}")
            cpu = time.process_time()
            result = await closed_loop(
                reactor,
                lambda n: limiter.check_prompt(f"r{run}{variant}u{n}"),
                args.concurrency,
                args.seconds,
            )
            cpu = time.process_time() - cpu
        if limiter.degraded or result["failed"]:
            raise SystemExit(VOID)
    finally:
        limiter.stop()
        await store.disconnect()
    return {
        "per_second": result["per_second"],
        "cpu_us_per_check": round(cpu / result["calls"] * 1e6, 1),
        "loaded_latency_us": result["latency_us"],
    }


async def floor(
    reactor: IReactorTime, server: RedisServer, args: argparse.Namespace
) -> dict[str, Any]:
    store = RedisStore(server.url, reactor, timeout=args.timeout_ms / 1000)
    try:
        await store.call("set", lambda c: c.set(FLOOR_KEY, "x" * 16))
        for _ in range(200):
            await store.call("get", lambda c: c.get(FLOOR_KEY))
        cpu = time.process_time()
        result = await closed_loop(
            reactor,
            lambda n: store.call("get", lambda c: c.get(FLOOR_KEY)),
            args.concurrency,
            args.seconds,
        )
        cpu = time.process_time() - cpu
    finally:
        await store.disconnect()
    return {
        "per_second": result["per_second"],
        "cpu_us_per_check": round(cpu / result["calls"] * 1e6, 1),
        "loaded_latency_us": result["latency_us"],
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "per_second": statistics.median(r["per_second"] for r in runs),
        "per_second_range": [
            min(r["per_second"] for r in runs),
            max(r["per_second"] for r in runs),
        ],
        "cpu_us_per_check": statistics.median(r["cpu_us_per_check"] for r in runs),
        "loaded_p99_us": statistics.median(r["loaded_latency_us"]["p99"] for r in runs),
        "runs": runs,
    }


async def main(reactor: IReactorTime, args: argparse.Namespace) -> None:
    variants = args.only or list(VARIANTS)
    raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    raw["get-floor"] = []
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as directory:
        server = RedisServer(Path(directory))
        server.start()
        try:
            for run in range(args.runs):
                server.cli("flushall")
                for variant in variants:
                    raw[variant].append(await one_variant(reactor, server, args, variant, run))
                if not args.only:
                    raw["get-floor"].append(await floor(reactor, server, args))
        finally:
            server.stop()
    report = {
        "settings": {
            "runs": args.runs,
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "txredisapi": txredisapi.__version__ if hasattr(txredisapi, "__version__") else "",
        },
        "variants": {name: medians(runs) for name, runs in raw.items() if runs},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"median of {args.runs} run(s), {args.concurrency} checks in flight")
    print(f"{'':16}{'checks/s':>10}{'range':>18}{'CPU µs/check':>14}{'loaded p99 µs':>15}")
    for name, m in report["variants"].items():
        low, high = m["per_second_range"]
        print(
            f"{name:16}{m['per_second']:>10,.0f}{f'{low:,}..{high:,}':>18}"
            f"{m['cpu_us_per_check']:>14.1f}{m['loaded_p99_us']:>15,.0f}"
        )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--smoke", action="store_true", help="one short run, for the test suite")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--only", action="append", choices=VARIANTS, help="run only this variant")
    parser.add_argument(
        "--timeout-ms",
        type=int,
        default=1000,
        help="Redis call timeout: generous, so a busy machine cannot void a run",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.seconds = 1, 0.3
    return args


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
