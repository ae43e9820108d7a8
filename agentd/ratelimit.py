"""Per-user rate limits: an exact sliding-window log in Redis, with an in-process fallback.

Two policies share one algorithm. ``prompts`` caps the prompts a user gets accepted and
``connections`` caps a user's WebSocket handshakes, each over ANY rolling window of
``window_seconds``: a hit is accepted only when fewer than ``limit`` hits were accepted in the
window that ends with it, so no window of that length ever holds more than ``limit``.

With Redis, one Lua script per check reads the user's override, takes the time from Redis
``TIME``, decides and, only when it accepts, records the hit and renews the key's TTL: one
round trip, atomic, exact across every agentd instance sharing the Redis. When a call fails or
times out, or another user of the same Redis saw it fail, the limiter answers from its
in-process log (same algorithm, same limits), which has been recording this instance's
accepted hits all along, until the Redis's ``RedisHealth`` finds it answering again. Without
Redis the in-process log is the limiter.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from agentd.config import RateLimitConfig
from agentd.health import CheckResult, HealthCheck
from agentd.redishealth import RedisHealth
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


class HandshakeLimiter(Protocol):
    """What the WebSocket route asks before an upgrade: ``RateLimiter.check_handshake``."""

    def check_handshake(self, user: str) -> Deferred[Decision]: ...


@dataclass(slots=True)  # made for every prompt: not frozen, which is dearer
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


# A limiter without a shared RedisHealth probes with the real script, writes included, for a
# user no one can be (user ids start with a letter or digit); its 1 ms window lets each probe's
# key expire at once.
PROBE = Policy("probe", 1, 1000)
PROBE_USER = "#probe"


def _probe(store: ScriptRunner) -> Deferred[Any]:
    return store.eval("ratelimit_probe", SCRIPT, PROBE.redis_keys(PROBE_USER), PROBE.script_args)


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
        logs = self._logs
        while logs:
            user = next(iter(logs))
            if logs[user][-1] > horizon:
                break
            del logs[user]
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
    concurrent-sessions policy that they enforce themselves. ``health`` is the Redis's shared
    state; without one, the limiter keeps its own, probed with its script from
    ``probe_initial_seconds`` doubling up to ``probe_max_seconds``.
    """

    def __init__(
        self,
        prompts: Policy,
        connections: Policy,
        store: ScriptRunner | None,
        clock: IReactorTime,
        probe_initial_seconds: float = 0.25,
        probe_max_seconds: float = 5.0,
        health: RedisHealth | None = None,
    ) -> None:
        self._prompts = prompts
        self._connections = connections
        self._store = store
        self._local = {p.name: SlidingWindowLog(p.window_us, clock) for p in (prompts, connections)}
        self._overrides: dict[tuple[str, str], int] = {}
        self._own_health = store is not None and health is None
        if store is not None and health is None:
            health = RedisHealth(
                partial(_probe, store),
                clock,
                first_delay=probe_initial_seconds,
                max_delay=probe_max_seconds,
            )
        self._health = health if store is not None else None
        if self._health is not None:
            self._health.observe(self)

    @classmethod
    def from_config(
        cls,
        config: RateLimitConfig,
        store: RedisStore | None,
        clock: IReactorTime,
        health: RedisHealth | None = None,
    ) -> RateLimiter:
        window_us = round(config.window_seconds * 1_000_000)
        return cls(
            Policy("prompts", config.prompts_per_minute, window_us),
            Policy("connections", config.connections_per_minute, window_us),
            store,
            clock,
            health=health,
        )

    def check_prompt(self, user: str) -> Deferred[Decision]:
        """Decide on a prompt from ``user``; an accepted prompt is counted."""
        return self._check(self._prompts, user)

    def check_handshake(self, user: str) -> Deferred[Decision]:
        """Decide on a WebSocket handshake from ``user``; an accepted one is counted."""
        return self._check(self._connections, user)

    @property
    def prompts(self) -> Policy:
        """The prompt policy, for a caller that runs ``SCRIPT`` inside a script of its own."""
        return self._prompts

    def decide_prompt(self, reply: Any, user: str) -> Decision:
        """The decision on a prompt from ``SCRIPT``'s reply, run by the caller with the
        prompt policy's keys and arguments; a reply that is not one falls back."""
        return self._decide_from_reply(reply, self._prompts, user)

    @property
    def degraded(self) -> bool:
        """True while Redis is configured but failing and in-process limits apply."""
        return self._health is not None and not self._health.up

    def health_checks(self) -> list[HealthCheck]:
        """ "ratelimit": degraded while the in-process fallback decides."""
        return [HealthCheck("ratelimit", self._health_check)]

    def _health_check(self) -> CheckResult:
        degraded = self.degraded
        return CheckResult("degraded" if degraded else "ok", {"fallback": degraded})

    def stop(self) -> None:
        """Stop probing Redis, when the limiter keeps its own health."""
        if self._own_health and self._health is not None:
            self._health.stop()

    def redis_lost(self, failure: Failure) -> None:
        _log.warn(
            "Rate limits fall back to in-process limits: Redis failed ({error}); "
            "probing Redis until it answers",
            error=repr(failure.value),
        )

    def redis_back(self, outage_seconds: float) -> None:
        _log.info(
            "Rate limits are back on Redis after {seconds:.1f} s of in-process limits",
            seconds=outage_seconds,
        )

    def _check(self, policy: Policy, user: str) -> Deferred[Decision]:
        store = self._store
        if store is None or self.degraded:
            return succeed(self._decide_locally(policy, user))
        d = store.eval("ratelimit", SCRIPT, policy.redis_keys(user), policy.script_args)
        return d.addCallbacks(
            self._decide_from_reply,
            self._fall_back,
            callbackArgs=(policy, user),
            errbackArgs=(policy, user),
        )

    def _decide_from_reply(self, reply: Any, policy: Policy, user: str) -> Decision:
        try:
            allowed, limit, wait_us = map(int, reply)
        except (TypeError, ValueError):
            return self._fall_back(Failure(), policy, user)
        self._remember_limit(policy, user, limit)
        if allowed:
            self._local[policy.name].record(user, limit)
            if self._health is not None:
                self._health.wrote()  # an accepted hit is a write; a rejection only reads
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

    def _fall_back(self, failure: Failure, policy: Policy, user: str) -> Decision:
        assert self._health is not None
        self._health.failed(failure)
        return self._decide_locally(policy, user)
