"""The usage recorder: every finished query recorded exactly once, without delaying anyone.

``record`` queues the event, and the events of a short window (``[usage] batch_ms``) go to
Redis together, a chunk per call. When Redis fails or is slow, records go to the spool
(agentd.usage.spool), fsynced before the record counts as handled, and are replayed in order,
through the same idempotent step, once Redis answers again or when agentd next starts. While
the Redis's ``RedisHealth`` knows it to fail, whoever saw the failure, new records go straight
to the spool. A record Redis applied is released only once a replica confirms it
(``UsageStore.confirm``): until then it waits in the spool too, and its replays, duplicates
unless a failover lost it, confirm it again. The recorder also holds the budgets
(agentd.usage.budgets) that the prompt gate checks, and reads reports.
docs/usage.md describes the whole of usage metering.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd import metrics, tally
from agentd.config import ConfigError, UsageConfig
from agentd.health import CheckResult, HealthCheck
from agentd.pricing import PriceTable
from agentd.redishealth import RedisHealth
from agentd.redisstore import RedisStore
from agentd.usage.budgets import BudgetDecision, Budgets
from agentd.usage.layout import day_expiry, month_expiry, month_of
from agentd.usage.memory_store import MemoryUsageStore
from agentd.usage.records import UsageEvent, UsageRecord, usd
from agentd.usage.redis_store import RedisUsageStore
from agentd.usage.reports import UsageReport, read_report
from agentd.usage.spool import Spool, SpoolLockedError, default_spool_dir
from agentd.usage.store import UsageStore

_log = Logger()

_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
# An agent's token counters (by _TOKEN_KINDS) and its cost counter.
_AgentMetrics = tuple[tuple[tally.CounterValue, ...], tally.CounterValue]
_EVENTS = {
    result: metrics.USAGE_EVENTS.labels(result)
    for result in ("recorded", "duplicate", "spooled", "unconfirmed", "replayed", "failed")
}
# Records sent in one call, and completed in one reactor round, so that neither holds the
# reactor (and the prompts and replies behind it) for long: 20 took 0.46 ms in memory.
FLUSH_CHUNK = 8
_DRAIN_BATCH = 50
# Replays are on nobody's path: they wait longer before calling Redis slow.
_REPLAY_TIMEOUT = 1.0
_STOP_FLUSH_SECONDS = 5.0
# A replica that did not confirm in time is behind or away: ask again after this.
_CONFIRM_RETRY_SECONDS = 1.0


class UsageRecorder:
    """Records usage events exactly once, checks budgets and reads reports for the gateway.

    With a spool, ``health`` is the Redis's shared state; without one given, the recorder keeps
    its own, probed with ``store.probe``.
    """

    def __init__(
        self,
        store: UsageStore,
        clock: IReactorTime,
        prices: PriceTable,
        *,
        retention_days: int = 90,
        monthly_budget_usd: float = 0.0,
        soft_budget_ratio: float = 0.8,
        batch_seconds: float = 0.02,
        spool: Spool | None = None,
        now: Callable[[], float] = time.time,
        health: RedisHealth | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._prices = prices
        self._retention_days = retention_days
        self._spool = spool
        self._now = now
        self._own_health = spool is not None and health is None
        if spool is not None and health is None:
            health = RedisHealth(store.probe, clock)
        self._health = health if spool is not None else None
        if self._health is not None:
            self._health.observe(self)
        self._budgets = Budgets(
            store,
            self._health,
            monthly_budget_usd=monthly_budget_usd,
            soft_budget_ratio=soft_budget_ratio,
            now=now,
        )
        self._stopping = False
        self._inflight = 0
        self._settled_waiters: list[Deferred[None]] = []
        self._draining = False
        self._drain_call: IDelayedCall | None = None
        self._batch_seconds = batch_seconds
        self._queue: list[tuple[UsageRecord, Deferred[None]]] = []
        self._flush_call: IDelayedCall | None = None
        # Queries whose tokens and cost this process counted, waiting in the spool for a
        # replica: a replay after a failover that lost them writes them again, not counts.
        self._counted: set[str] = set()
        self._agent_metrics: dict[str, _AgentMetrics] = {}

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
        health: RedisHealth | None = None,
    ) -> UsageRecorder:
        """In-memory without a store; with one, Redis plus a spool in ``[usage] spool_dir``.
        ``health`` is the store's shared state (by default the recorder's own)."""
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
            batch_seconds=config.batch_ms / 1000,
            spool=spool,
            now=now,
            health=health if store is not None else None,
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
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        for start in range(0, len(queued), FLUSH_CHUNK):
            self._record_now(queued[start : start + FLUSH_CHUNK])
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        self._drain_call = None
        await self._settled()
        if self._spool is None:
            return
        deadline = self._clock.seconds() + _STOP_FLUSH_SECONDS
        while self._spool.depth and self._redis_up() and self._clock.seconds() < deadline:
            released, attempted, _ = await self._drain_batch()
            if released < attempted:
                break
        if self._spool.depth:
            _log.warn(
                "{count} usage events stay in {path} for the next start",
                count=self._spool.depth,
                path=self._spool.path,
            )
        await self._spool.close()
        if self._own_health and self._health is not None:
            self._health.stop()

    # Recording

    def record(self, event: UsageEvent) -> Deferred[None]:
        """Record ``event`` once; fires (never fails) when Redis has it or the spool has it on
        disk.

        The event is checked and priced at once. It then waits up to the batch window for
        others to share its call to Redis; a full chunk goes earlier, when a prompt has gone
        to its agent (``waiting_for_agent``). Nothing goes out before the reactor's current
        I/O pass is over, so what the caller sends right after this call, such as the
        ``done`` message itself, leaves first.
        """
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
        done: Deferred[None] = Deferred()
        done.addBoth(self._settle)
        self._inflight += 1
        if self._stopping:
            self._record_now([(record, done)])
            return done
        queue = self._queue
        queue.append((record, done))
        if len(queue) == 1:
            self._flush_call = self._clock.callLater(self._batch_seconds, self._window_over)
        return done

    def waiting_for_agent(self) -> None:
        """A prompt has just gone to its agent: the gateway waits for the answer now, so a
        full chunk goes, rather than at the next prompt, which would queue behind it (in
        Redis, and in the reactor completing its records). The rest waits for its window."""
        if len(self._queue) < FLUSH_CHUNK or self._stopping:
            return
        chunk = self._take_chunk()
        if not self._queue and self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush_call = None
        self._record_now(chunk)

    def _window_over(self) -> None:
        # A call scheduled from a timed call waits for the reactor's next round of timed
        # calls, and the reactor polls its sockets in between: what the callers wrote has
        # left, even if the window was shorter than the I/O pass that opened it.
        self._flush_call = self._clock.callLater(0, self._flush)

    def _take_chunk(self) -> list[tuple[UsageRecord, Deferred[None]]]:
        chunk, self._queue = self._queue[:FLUSH_CHUNK], self._queue[FLUSH_CHUNK:]
        return chunk

    def _flush(self) -> None:
        chunk = self._take_chunk()
        # What is left has waited its window already.
        self._flush_call = self._clock.callLater(0, self._flush) if self._queue else None
        self._record_now(chunk)

    def _record_now(self, queued: list[tuple[UsageRecord, Deferred[None]]]) -> None:
        """Record the queued records, all that go to Redis in one call; each record's Deferred
        fires once it is handled."""
        batch: list[UsageRecord] = []
        waiting: list[Deferred[None]] = []
        for record, done in queued:
            if self._spool is not None and (self._stopping or not self._redis_up()):
                # Redis is known to fail: straight to disk, no timeout to wait for. Records
                # go to Redis again once it takes a write; the backlog is replayed in its own
                # order.
                self._to_spool(record).chainDeferred(done)
                continue
            batch.append(record)
            waiting.append(done)
        if batch:
            handled = Deferred.fromCoroutine(self._record_in_redis(batch))
            handled.addCallback(_fire, waiting)

    async def _record_in_redis(self, records: list[UsageRecord]) -> None:
        """Apply ``records`` in one call, spooling them when Redis fails and each that no
        replica confirms; never fails: a bug is logged."""
        try:
            try:
                results = await self._apply(records)
            except Exception:
                if self._spool is None or self._health is None:
                    raise  # the in-memory store failing is a bug: logged, never retried
                self._health.failed(Failure())
                await gatherResults([self._to_spool(record) for record in records])
                return
            for result, record in zip(results, records, strict=True):
                self._applied(result, record, False)
            if self._spool is None:
                return
            confirmed = await self._confirmed(results, records)
            unconfirmed = [r for r, ok in zip(records, confirmed, strict=True) if not ok]
            if unconfirmed:
                await gatherResults([self._keep_unconfirmed(record) for record in unconfirmed])
        except Exception:
            failure = Failure()
            for record in records:
                self._unexpected(failure, record)

    async def _confirmed(self, results: list[str], records: list[UsageRecord]) -> list[bool]:
        """Whether a replica has each record, asked in one round; an expired record was not
        written, and needs none."""
        written = [r for result, r in zip(results, records, strict=True) if result != "expired"]
        if not written:
            return [True] * len(results)
        confirmed = iter(await self._store.confirm(written))
        return [result == "expired" or next(confirmed) for result in results]

    def _keep_unconfirmed(self, record: UsageRecord) -> Deferred[None]:
        """Applied, but no replica confirmed it in time: a failover now could lose it, so it
        waits in the spool, to be replayed until a replica confirms it."""
        assert self._spool is not None
        _EVENTS["unconfirmed"].inc()
        self._counted.add(record.query_id)
        written = self._spool.append(record)
        metrics.USAGE_SPOOL_DEPTH.set(self._spool.depth)
        self._schedule_drain(_CONFIRM_RETRY_SECONDS)
        return written

    def _apply(self, records: list[UsageRecord], replay: bool = False) -> Deferred[list[str]]:
        days = self._retention_days
        items = [(r, day_expiry(r.day, days), month_expiry(r.month, days)) for r in records]
        return maybeDeferred(self._store.apply_all, items, _REPLAY_TIMEOUT if replay else None)

    def _applied(self, result: str, record: UsageRecord, replayed: bool) -> None:
        counted = record.query_id in self._counted
        if result == "recorded":
            if self._health is not None:
                self._health.wrote()
            _EVENTS["replayed" if replayed else "recorded"].inc()
            if counted:
                return
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
                cost.inc(usd(record.cost))
        elif result == "duplicate":
            if not counted:  # for a record waiting for its replica, the expected answer
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

    def _metrics_for(self, agent: str) -> _AgentMetrics:
        """The agent's token and cost counters (labels() is a lookup; once per agent)."""
        children = self._agent_metrics.get(agent)
        if children is None:
            tokens = tuple(metrics.TOKENS.labels(agent, kind) for kind in _TOKEN_KINDS)
            children = self._agent_metrics[agent] = (tokens, metrics.COST.labels(agent))
        return children

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
        if self._redis_up():
            self._schedule_drain(0)
        return written

    def _redis_up(self) -> bool:
        return self._health is None or self._health.up

    def redis_lost(self, failure: Failure) -> None:
        _log.warn(
            "usage store unavailable ({reason}); spooling usage to {path}",
            reason=failure.getErrorMessage(),
            path=self._spool.path if self._spool else "",
        )

    def redis_back(self, outage_seconds: float) -> None:
        _log.info("usage store answers again")
        self._schedule_drain(0)

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
        if not self._redis_up():
            return  # redis_back drains
        self._draining = True
        self._inflight += 1
        d = Deferred.fromCoroutine(self._drain_batch())
        d.addCallback(self._drained)
        d.addErrback(lambda f: _log.failure("replaying the usage spool failed", f))
        d.addBoth(self._drain_settled)

    async def _drain_batch(self) -> tuple[int, int, bool]:
        """Apply the oldest spooled records in order and release those a replica confirmed:
        how many were released, of how many, and whether a call failed."""
        assert self._spool is not None
        batch = self._spool.pending(_DRAIN_BATCH)
        try:
            results = await self._apply(batch, True)
        except Exception:
            if self._health is not None:
                self._health.failed(Failure())
            return 0, len(batch), True
        for result, record in zip(results, batch, strict=True):
            self._applied(result, record, True)
        confirmed = await self._confirmed(results, batch)
        released = next((i for i, ok in enumerate(confirmed) if not ok), len(confirmed))
        for record in batch[:released]:
            self._counted.discard(record.query_id)
        self._spool.acknowledge(released)
        metrics.USAGE_SPOOL_DEPTH.set(self._spool.depth)
        return released, len(batch), False

    def _drained(self, outcome: tuple[int, int, bool]) -> None:
        assert self._spool is not None
        released, attempted, failed = outcome
        if released == attempted:
            if self._spool.depth:
                self._schedule_drain(0)
        elif not failed:
            self._schedule_drain(_CONFIRM_RETRY_SECONDS)
        # A call failed and told the health: redis_back goes on.

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
            "ok": self._redis_up() and writable,
            "spool_depth": self.spool_depth,
            "spool_writable": writable,
            "redis": None if self._health is None else self._health.up,
        }

    def health_checks(self) -> list[HealthCheck]:
        """ "usage": degraded while records go to the spool or the spool cannot be written."""
        return [HealthCheck("usage", self._health_check)]

    def _health_check(self) -> CheckResult:
        detail = self.health()
        return CheckResult("ok" if detail["ok"] else "degraded", detail)

    # Budgets

    @property
    def budgets(self) -> Budgets:
        """The monthly budgets over this recorder's store, which the prompt gate checks."""
        return self._budgets

    def check_budget(self, user: str, project: str) -> Deferred[BudgetDecision]:
        """May ``user`` send a prompt in ``project`` (see ``Budgets.check``)."""
        return self._budgets.check(user, project)

    def set_budget(self, scope: str, subject: str, usd: float | None) -> Deferred[None]:
        """Override the monthly budget of one user or project (0: none; None: the default)."""
        return self._budgets.set(scope, subject, usd)

    # Reading

    def current_month(self) -> str:
        return month_of(self._now())

    def report(self, scope: str, subject: str, month: str) -> Deferred[UsageReport]:
        """The month's report, with the budget in force for the current month; fails when the
        store cannot be read."""
        return Deferred.fromCoroutine(
            read_report(self._store, scope, subject, month, self._budgets)
        )


def _fire(_: object, waiting: list[Deferred[None]]) -> None:
    for done in waiting:
        done.callback(None)
