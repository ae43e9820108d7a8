"""Whether Redis takes agentd's writes: one state per Redis store, shared by all its users.

The rate limiter, the usage recorder, the budget checks and /health report each failed Redis
call here. The first failure marks Redis down, and every user takes its fallback at once
(in-process limits, the usage spool, budgets not enforced) instead of waiting on Redis. While
Redis is down a probe runs on the injected clock, with the backoff of ``agentd.retry``
(jittered when ``rand`` is given); the first write that succeeds, the probe's or a user's,
marks it up. Observers hear of each change once, so an outage and its end look the same to
every user, and the gauge ``agentd_ratelimit_degraded`` follows the state.

The probe agentd wires writes a key that expires at once, bounded by the store's timeout: a
Redis that answers PING but refuses writes (out of memory under ``noeviction``, a read-only
replica) is down for agentd, whose fallbacks exist for its writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from agentd import metrics
from agentd.redisstore import RedisStore
from agentd.retry import backoff_delay

PROBE_KEY = "agentd:probe"


def write_probe(store: RedisStore) -> Deferred[Any]:
    """SET a key that lives one millisecond, under the store's own timeout."""
    return store.call("redis_probe", lambda c: c.set(PROBE_KEY, "1", pexpire=1))


def _full_delay() -> float:
    return 1.0


class RedisObserver(Protocol):
    """A user of Redis with a fallback: told when Redis goes down and when it is back."""

    def redis_lost(self, failure: Failure) -> None:
        """A call to Redis failed with ``failure``: use the fallback until ``redis_back``."""

    def redis_back(self, outage_seconds: float) -> None:
        """Redis took a write again, ``outage_seconds`` after it went down."""


class RedisHealth:
    """Up or down for one Redis store; probes it while down and tells its observers.

    Only a write brings Redis back: a Redis that answers reads but refuses writes stays down,
    rather than flapping with every answer.
    """

    def __init__(
        self,
        probe: Callable[[], Deferred[Any]],
        clock: IReactorTime,
        *,
        first_delay: float = 0.25,
        max_delay: float = 5.0,
        rand: Callable[[], float] | None = None,
    ) -> None:
        self._probe = probe
        self._clock = clock
        self._first_delay = first_delay
        self._max_delay = max_delay
        # Without jitter, probes come after exactly first_delay, doubling up to max_delay.
        self._rand = rand or _full_delay
        self._observers: list[RedisObserver] = []
        self._up = True
        self._down_since = 0.0
        self._outage = 0
        self._attempt = 0
        self._probe_call: IDelayedCall | None = None
        self._stopped = False
        metrics.REDIS_DEGRADED.set(0)

    @classmethod
    def of_store(
        cls,
        store: RedisStore,
        clock: IReactorTime,
        *,
        rand: Callable[[], float] | None = None,
    ) -> RedisHealth:
        """The health of ``store``, probed with ``write_probe``."""
        return cls(lambda: write_probe(store), clock, rand=rand)

    @property
    def up(self) -> bool:
        """False from a failed call until a write succeeds."""
        return self._up

    def observe(self, observer: RedisObserver) -> None:
        self._observers.append(observer)

    def failed(self, failure: Failure) -> None:
        """A call to Redis failed or timed out: Redis is down until a probe succeeds."""
        if not self._up:
            return
        self._up = False
        self._down_since = self._clock.seconds()
        self._outage += 1
        self._attempt = 0
        metrics.REDIS_DEGRADED.set(1)
        self._schedule_probe()
        for observer in tuple(self._observers):
            observer.redis_lost(failure)

    def wrote(self) -> None:
        """A user's write to Redis succeeded: Redis is up, if it was down."""
        self._back()

    def reconnected(self) -> None:
        """A connection to Redis became usable (after an outage, perhaps to a new primary):
        if Redis is down, probe now rather than at the next step of the backoff."""
        if not self._up and not self._stopped:
            self.ping().addErrback(lambda _: None)

    def ping(self) -> Deferred[Any]:
        """Probe Redis now (the /health check): fires with the probe's answer or fails with
        its failure, which change the state as a scheduled probe's would."""
        d = maybeDeferred(self._probe)

        def answered(result: object) -> object:
            self.wrote()
            return result

        def failed(failure: Failure) -> Failure:
            self.failed(failure)
            return failure

        return d.addCallbacks(answered, failed)

    def stop(self) -> None:
        """Probe no more; the state stays as it is."""
        self._stopped = True
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None

    def _schedule_probe(self) -> None:
        if self._stopped or self._up:
            return
        delay = backoff_delay(self._attempt, self._first_delay, self._max_delay, self._rand)
        self._attempt += 1
        self._probe_call = self._clock.callLater(delay, self._run_probe, self._outage)

    def _run_probe(self, outage: int) -> None:
        self._probe_call = None
        d = maybeDeferred(self._probe)
        d.addCallbacks(lambda _: self.wrote(), self._probe_failed, errbackArgs=(outage,))

    def _probe_failed(self, failure: Failure, outage: int) -> None:
        # A probe of an earlier outage has no say in this one's schedule.
        if outage == self._outage:
            self._schedule_probe()

    def _back(self) -> None:
        if self._up:
            return
        self._up = True
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
        metrics.REDIS_DEGRADED.set(0)
        outage_seconds = self._clock.seconds() - self._down_since
        for observer in tuple(self._observers):
            observer.redis_back(outage_seconds)
