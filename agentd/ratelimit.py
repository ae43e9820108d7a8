"""Per-user rate limits: an exact sliding-window log in Redis, with an in-process fallback.

Two policies share one algorithm. ``prompts`` caps the prompts a user gets accepted and
``connections`` caps a user's WebSocket handshakes, each over ANY rolling window of
``window_seconds``: a hit is accepted only when fewer than ``limit`` hits were accepted in the
window that ends with it, so no window of that length ever holds more than ``limit``.

With Redis, one Lua script per check reads the user's override, takes the time from Redis
``TIME``, decides and, only when it accepts, records the hit and renews the key's TTL: one
round trip, atomic, exact across every agentd instance sharing the Redis. When a call fails or
times out, the limiter answers from its in-process log (same algorithm, same limits), which
has been recording this instance's accepted hits all along, and probes Redis with backoff until
it answers again. Without Redis the in-process log is the limiter.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd import metrics
from agentd.config import RateLimitConfig
from agentd.redisstore import RedisStore

_log = Logger()

# KEYS[1]  the user's log for one policy: accepted-hit times in microseconds, newest first,
#          never longer than the limit
# KEYS[2]  the user's override hash (written by operators, only read here)
# ARGV     default limit, window in microseconds, override field (the policy name)
# Returns  {1, limit, 0} when the hit is accepted and recorded, otherwise
#          {0, limit, microseconds until the oldest hit that counts leaves the window}.
# A rejection only reads. Numbers written go through %d: Redis would print a bare Lua number
# of this size in exponent form on some versions. Replies are integers only: txredisapi parses
# those in one pass, but hands over at most one bulk-string reply per reactor turn.
SCRIPT = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local override = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '')
if override and override >= 1 and override <= 10000 and override == math.floor(override) then
  limit = override
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
if redis.call('LLEN', KEYS[1]) >= limit then
  local wait = tonumber(redis.call('LINDEX', KEYS[1], limit - 1)) + window - now
  if wait > 0 then
    return {0, limit, wait}
  end
end
-- TIME can step back (NTP, failover); the log stays ordered.
local stamp = math.max(now, tonumber(redis.call('LINDEX', KEYS[1], 0) or 0))
redis.call('LPUSH', KEYS[1], string.format('%d', stamp))
redis.call('LTRIM', KEYS[1], 0, limit - 1)
redis.call('PEXPIRE', KEYS[1], math.ceil((stamp + window - now) / 1000))
return {1, limit, 0}
"""

# Limits learned from Redis overrides, kept so a fallback applies them too.
_MAX_REMEMBERED_OVERRIDES = 10_000


class ScriptRunner(Protocol):
    """What the limiter needs from Redis: ``RedisStore.eval``."""

    def eval(
        self, operation: str, script: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Deferred[Any]: ...


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str  # "prompts" | "connections"
    limit: int
    window_ms: int
    retry_after_ms: int  # 0 when allowed; exact otherwise


@dataclass(frozen=True)
class Policy:
    """At most ``limit`` accepted hits per user in any rolling ``window_us`` microseconds."""

    name: str
    limit: int
    window_us: int
    # The script's ARGV, encoded once rather than on every check.
    script_args: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        args = (str(self.limit).encode(), str(self.window_us).encode(), self.name.encode())
        object.__setattr__(self, "script_args", args)

    @property
    def window_ms(self) -> int:
        return round(self.window_us / 1000)

    def redis_keys(self, user: str) -> tuple[str, str]:
        """The user's log and override hash, hash-tagged to one Redis Cluster slot."""
        return f"rl:{{{user}}}:{self.name}", f"rl:{{{user}}}:limits"


# The probe runs the real script, writes included, for a user no one can be (user ids start
# with a letter or digit); its 1 ms window lets each probe's key expire at once.
PROBE = Policy("probe", 1, 1000)
PROBE_USER = "#probe"


class SlidingWindowLog:
    """In-process logs of accepted hits per user: the Redis script's algorithm, local clock.

    A user's log holds at most ``limit`` times; a user whose newest hit has left the window
    is forgotten, so memory follows the users active in the last window. Logs are arrays of
    machine integers, not containers of int objects: 8 bytes a hit, and nothing for the
    garbage collector to walk, whose pauses over a large log would delay Redis replies past
    their timeout.
    """

    def __init__(self, window_us: int, clock: IReactorTime) -> None:
        self.window_us = window_us
        self._clock = clock
        # Least recently hit first, so forgetting idle users is a look at the front.
        self._logs: OrderedDict[str, array[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def hit(self, user: str, limit: int) -> int:
        """Record a hit if fewer than ``limit`` are in the window: 0, else microseconds to wait."""
        now = self._now_forgetting_idle_users()
        log = self._logs.get(user)
        if log is not None and len(log) >= limit:
            wait = log[-limit] + self.window_us - now
            if wait > 0:
                return wait
        self._append(user, log, limit, now)
        return 0

    def record(self, user: str, limit: int) -> None:
        """Record a hit that Redis accepted, so a fallback starts from this instance's history."""
        now = self._now_forgetting_idle_users()
        self._append(user, self._logs.get(user), limit, now)

    def _now_forgetting_idle_users(self) -> int:
        now = round(self._clock.seconds() * 1_000_000)
        horizon = now - self.window_us
        while self._logs:
            user, log = next(iter(self._logs.items()))
            if log[-1] > horizon:
                break
            del self._logs[user]
        return now

    def _append(self, user: str, log: array[int] | None, limit: int, now: int) -> None:
        if log is None:
            log = self._logs[user] = array("q")
        else:
            self._logs.move_to_end(user)
        # The reactor's clock can step back too; the log stays ordered.
        log.append(max(now, log[-1]) if log else now)
        if len(log) > limit:
            del log[: len(log) - limit]


class RateLimiter:
    """Per-user prompt and handshake limits: Redis while it answers, in-process otherwise.

    Its callers count the decisions (``agentd_ratelimit_decisions_total``), next to the
    concurrent-sessions policy that they enforce themselves.
    """

    def __init__(
        self,
        prompts: Policy,
        connections: Policy,
        store: ScriptRunner | None,
        clock: IReactorTime,
        probe_initial_seconds: float = 0.25,
        probe_max_seconds: float = 5.0,
    ) -> None:
        self._prompts = prompts
        self._connections = connections
        self._store = store
        self._clock = clock
        self._local = {p.name: SlidingWindowLog(p.window_us, clock) for p in (prompts, connections)}
        self._overrides: dict[tuple[str, str], int] = {}
        self._probe_initial = probe_initial_seconds
        self._probe_max = probe_max_seconds
        self._probe_delay = probe_initial_seconds
        self._probe_call: IDelayedCall | None = None
        self._degraded = False
        self._degraded_at = 0.0
        self._stopped = False
        metrics.RATELIMIT_DEGRADED.set(0)

    @classmethod
    def from_config(
        cls, config: RateLimitConfig, store: RedisStore | None, clock: IReactorTime
    ) -> RateLimiter:
        window_us = round(config.window_seconds * 1_000_000)
        return cls(
            Policy("prompts", config.prompts_per_minute, window_us),
            Policy("connections", config.connections_per_minute, window_us),
            store,
            clock,
        )

    def check_prompt(self, user: str) -> Deferred[Decision]:
        """Decide on a prompt from ``user``; an accepted prompt is counted."""
        return self._check(self._prompts, user)

    def check_handshake(self, user: str) -> Deferred[Decision]:
        """Decide on a WebSocket handshake from ``user``; an accepted one is counted."""
        return self._check(self._connections, user)

    @property
    def degraded(self) -> bool:
        """True while Redis is configured but failing and in-process limits apply."""
        return self._degraded

    def stop(self) -> None:
        """Stop probing Redis."""
        self._stopped = True
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None

    def _check(self, policy: Policy, user: str) -> Deferred[Decision]:
        store = self._store
        if store is None or self._degraded:
            return succeed(self._decide_locally(policy, user))
        d = store.eval("ratelimit", SCRIPT, policy.redis_keys(user), policy.script_args)
        return d.addCallbacks(
            self._decide_from_reply,
            self._fall_back,
            callbackArgs=(policy, user, store),
            errbackArgs=(policy, user, store),
        )

    def _decide_from_reply(
        self, reply: Any, policy: Policy, user: str, store: ScriptRunner
    ) -> Decision:
        try:
            allowed, limit, wait_us = (int(value) for value in reply)
        except (TypeError, ValueError):
            return self._fall_back(Failure(), policy, user, store)
        self._remember_limit(policy, user, limit)
        if allowed:
            self._local[policy.name].record(user, limit)
        return self._decided(policy, bool(allowed), limit, wait_us)

    def _decide_locally(self, policy: Policy, user: str) -> Decision:
        limit = self._overrides.get((policy.name, user), policy.limit)
        wait_us = self._local[policy.name].hit(user, limit)
        return self._decided(policy, wait_us == 0, limit, wait_us)

    def _decided(self, policy: Policy, allowed: bool, limit: int, wait_us: int) -> Decision:
        retry_after_ms = 0 if allowed else -(-wait_us // 1000)
        return Decision(allowed, policy.name, limit, policy.window_ms, retry_after_ms)

    def _remember_limit(self, policy: Policy, user: str, limit: int) -> None:
        key = (policy.name, user)
        if limit == policy.limit:
            self._overrides.pop(key, None)
            return
        self._overrides[key] = limit
        if len(self._overrides) > _MAX_REMEMBERED_OVERRIDES:
            del self._overrides[next(iter(self._overrides))]

    def _fall_back(
        self, failure: Failure, policy: Policy, user: str, store: ScriptRunner
    ) -> Decision:
        if not self._degraded:
            self._degraded = True
            self._degraded_at = self._clock.seconds()
            metrics.RATELIMIT_DEGRADED.set(1)
            _log.warn(
                "Rate limits fall back to in-process limits: Redis failed ({error}); "
                "probing Redis until it answers",
                error=repr(failure.value),
            )
            self._probe_delay = self._probe_initial
            self._schedule_probe(store)
        return self._decide_locally(policy, user)

    def _schedule_probe(self, store: ScriptRunner) -> None:
        if not self._stopped:
            self._probe_call = self._clock.callLater(self._probe_delay, self._probe, store)

    def _probe(self, store: ScriptRunner) -> None:
        self._probe_call = None
        d = store.eval("ratelimit_probe", SCRIPT, PROBE.redis_keys(PROBE_USER), PROBE.script_args)
        d.addCallbacks(self._recovered, self._probe_failed, errbackArgs=(store,))

    def _recovered(self, reply: Any) -> None:
        self._degraded = False
        metrics.RATELIMIT_DEGRADED.set(0)
        _log.info(
            "Rate limits are back on Redis after {seconds:.1f} s of in-process limits",
            seconds=self._clock.seconds() - self._degraded_at,
        )

    def _probe_failed(self, failure: Failure, store: ScriptRunner) -> None:
        self._probe_delay = min(self._probe_delay * 2, self._probe_max)
        self._schedule_probe(store)
