"""Confirming writes on a replica: Redis WAIT, once per round for every write that asks.

Redis replicates asynchronously: a write the primary acknowledged can be missing on the
replica Sentinel promotes. Writes that must survive a failover (usage records, stored keys)
ask ``confirm`` once they are done. Requests are grouped into rounds, one at a time, on a
connection of their own, so that a WAIT never holds up the rate limiter's calls. A round sends,
back to back, a script that checks each write's witness and then writes a key of its own,
followed by ``WAIT 1 <timeout>``: WAIT covers everything this connection's last write follows
in the replication stream, which includes every write already acknowledged on any
connection. The witness check makes that hold on the server the round reached: a write whose
witness is missing there (it was made on a primary that has since been replaced) is
unconfirmed, however many replicas acknowledge the round.

Whether to wait at all follows the primary's ``INFO replication``, read at most once a second:
agentd waits while the primary has a replica connected, and for ``grace`` seconds after it
last had one, since a replica that lost its link for a moment can still be promoted. A primary
without replicas for longer is not waited on. With ``verify`` (Sentinel mode, where the
primary can change between a write and its round) the witnesses are still checked then;
without it (a standalone Redis) such a round sends nothing but that once-a-second INFO, and
needs no connection in between, as before replicas existed.
"""

from __future__ import annotations

import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from agentd import metrics
from agentd.redisprimary import Address

ROUND_KEY = "agentd:confirm"
REPLICA_CHECK_SECONDS = 1.0
# Witnesses per round; a burst beyond that waits for the next round.
MAX_ROUND = 500

# KEYS[1]   the round's own key, written last so that WAIT covers every witness
# KEYS[2..] each witness's key
# ARGV      per witness: its kind (k: the key exists, h: the hash field has the value,
#           a: the hash field is absent), the field, the value
# Returns   per witness, 1 when it holds here, else 0.
ROUND_SCRIPT = """
local held = {}
for i = 2, #KEYS do
  local kind, field, value = ARGV[3 * i - 5], ARGV[3 * i - 4], ARGV[3 * i - 3]
  local ok
  if kind == 'k' then
    ok = redis.call('EXISTS', KEYS[i]) == 1
  elseif kind == 'h' then
    ok = redis.call('HGET', KEYS[i], field) == value
  else
    ok = redis.call('HEXISTS', KEYS[i], field) == 0
  end
  held[#held + 1] = ok and 1 or 0
end
redis.call('SET', KEYS[1], '1', 'PX', 1000)
return held
"""

_CONNECTED_REPLICAS = re.compile(r"^connected_slaves:(\d+)", re.MULTILINE)
_ROLE = re.compile(r"^role:(\w+)", re.MULTILINE)
_LATENCY = metrics.REDIS_LATENCY.labels("replica_confirm")
_RESULTS = {
    result: metrics.REPLICA_CONFIRMATIONS.labels(result)
    for result in ("confirmed", "unconfirmed", "no_replica")
}


class NotPrimary(Exception):
    """The server the round reached is a replica: the primary is changing."""


@dataclass(frozen=True)
class Witness:
    """What shows that a write is on a server: a key that exists, or a hash field with a given
    value (or without one)."""

    kind: str
    key: str
    field: str = ""
    value: str = ""

    @classmethod
    def key_exists(cls, key: str) -> Witness:
        return cls("k", key)

    @classmethod
    def hash_value(cls, key: str, field: str, value: str) -> Witness:
        return cls("h", key, field, value)

    @classmethod
    def hash_absent(cls, key: str, field: str) -> Witness:
        return cls("a", key, field)


def _first_failure(failure: Failure) -> Failure:
    first = failure.value
    return first.subFailure if isinstance(first, FirstError) else failure


def connected_replicas(info: str) -> int:
    """The replicas a primary's ``INFO replication`` lists; ``NotPrimary`` on a replica."""
    role = _ROLE.search(info)
    if role is not None and role.group(1) != "master":
        raise NotPrimary(f"the server is a {role.group(1)}")
    found = _CONNECTED_REPLICAS.search(info)
    return int(found.group(1)) if found else 0


Connection = Callable[[], Deferred[tuple[Any, Address | None]]]


class ReplicaConfirmer:
    """Confirms witnessed writes on at least one replica, in rounds; see the module doc.

    ``connection`` gives the round's own connection (a txredisapi protocol) and the address it
    reached; ``timeout`` bounds each call, ``wait`` is WAIT's own timeout (0: confirm nothing,
    every write counts as confirmed), ``verify`` checks witnesses even with no replica to wait
    for, ``failed`` hears of a round that failed.
    """

    def __init__(
        self,
        connection: Connection,
        clock: IReactorTime,
        *,
        timeout: float,
        wait: float,
        grace: float,
        verify: bool = False,
        failed: Callable[[Failure], None] | None = None,
    ) -> None:
        self._connection = connection
        self._clock = clock
        self._timeout = timeout
        self._wait_ms = round(wait * 1000)
        self._grace = grace
        self._verify = verify
        self._failed = failed
        self._waiting: list[tuple[Witness, Deferred[bool]]] = []
        self._running = False
        self._primary: Address | None = None
        self._replicas = 0
        self._seen_at: float | None = None
        self._checked_at: float | None = None

    def confirm(self, witness: Witness) -> Deferred[bool]:
        """Fires True once a replica has the write ``witness`` shows (or there is no replica to
        wait for), False when that was not confirmed in time; never fails."""
        return self.confirm_all([witness]).addCallback(operator.itemgetter(0))

    def confirm_all(self, witnesses: Sequence[Witness]) -> Deferred[list[bool]]:
        """``confirm`` for each witness, all in the same round."""
        if not self._wait_ms:
            return succeed([True] * len(witnesses))
        if self._nothing_to_wait_for():
            # What a round would answer, without one: every usage record asks.
            _RESULTS["no_replica"].inc(len(witnesses))
            return succeed([True] * len(witnesses))
        asked: list[Deferred[bool]] = []
        for witness in witnesses:
            done: Deferred[bool] = Deferred()
            self._waiting.append((witness, done))
            asked.append(done)
        if not self._running:
            self._next_round()
        return gatherResults(asked)

    def _next_round(self) -> None:
        batch, self._waiting = self._waiting[:MAX_ROUND], self._waiting[MAX_ROUND:]
        self._running = True
        started = time.perf_counter()
        d = Deferred.fromCoroutine(self._round([witness for witness, _ in batch]))
        d.addTimeout(2 * self._timeout + self._wait_ms / 1000, self._clock)
        d.addBoth(self._finished, batch, started)

    async def _round(self, witnesses: list[Witness]) -> tuple[list[bool], bool]:
        """Each witness confirmed or not, and whether there was a replica to wait for."""
        if self._nothing_to_wait_for():
            return [True] * len(witnesses), False  # not even a connection needed
        connection, address = await self._connection()
        if address != self._primary:
            self._primary, self._replicas, self._seen_at, self._checked_at = address, 0, None, None
        if not self._checked_recently():
            now = self._clock.seconds()
            self._replicas = connected_replicas(
                str(await connection.execute_command("INFO", "replication"))
            )
            self._checked_at = now
            if self._replicas:
                self._seen_at = now
        replica = self._replica()
        if not replica and not self._verify:
            return [True] * len(witnesses), False
        keys = [ROUND_KEY, *(w.key for w in witnesses)]
        args = [part for w in witnesses for part in (w.kind, w.field, w.value)]
        checked = connection.execute_command("EVAL", ROUND_SCRIPT, len(keys), *keys, *args)
        if not replica:
            return [bool(int(flag)) for flag in await checked], False
        # Sent back to back on one connection: WAIT follows the script's write.
        waited = connection.execute_command("WAIT", 1, self._wait_ms)
        both = gatherResults([checked, waited], consumeErrors=True)
        held, acknowledged = await both.addErrback(_first_failure)
        confirmed = int(acknowledged) >= 1
        return [confirmed and bool(int(flag)) for flag in held], True

    def _nothing_to_wait_for(self) -> bool:
        """Whether the primary was seen within the second to have had no replica for longer
        than the grace, and no witness needs checking."""
        return not self._verify and self._checked_recently() and not self._replica()

    def _checked_recently(self) -> bool:
        checked = self._checked_at
        return checked is not None and self._clock.seconds() - checked < REPLICA_CHECK_SECONDS

    def _replica(self) -> bool:
        """Whether the primary has a replica, or had one within the grace."""
        seen = self._seen_at
        recent = seen is not None and self._clock.seconds() - seen <= self._grace
        return bool(self._replicas) or recent

    def _finished(
        self,
        outcome: tuple[list[bool], bool] | Failure,
        batch: list[tuple[Witness, Deferred[bool]]],
        started: float,
    ) -> None:
        self._running = False
        if isinstance(outcome, Failure):
            metrics.REDIS_ERRORS.labels("replica_confirm").inc()
            if self._failed is not None:
                self._failed(outcome)
            results, replica = [False] * len(batch), True
        else:
            _LATENCY.observe(time.perf_counter() - started)
            results, replica = outcome
        for (_, done), confirmed in zip(batch, results, strict=True):
            if not confirmed:
                _RESULTS["unconfirmed"].inc()
            else:
                _RESULTS["confirmed" if replica else "no_replica"].inc()
            done.callback(confirmed)
        if self._waiting:
            self._next_round()
