"""Timeouts for many Deferreds at once, with one timed call between them.

``Deferred.addTimeout`` schedules a timed call for each Deferred and cancels it when the
Deferred fires. For the two Redis calls of every prompt that is four trips a prompt through the
reactor's heap of timed calls, and a cancelled call left in it until the reactor sweeps it out:
about 6% of agentd's CPU per prompt on Redis. Here each Deferred's deadline joins a heap of its
own, and one timed call waits for the earliest deadline that has not answered yet. Deferreds
that answered are dropped from the front of the heap as new ones come, so it holds about as
many as are in flight.

A Deferred still waiting at its deadline is cancelled, and its cancellation becomes a
``TimeoutError``, as ``addTimeout`` does it; one cancelled by anything else fails with
``CancelledError``, also as there.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

_log = Logger()


class _Waiting:
    """One Deferred's place in the heap: ``deferred`` is None once it answered."""

    __slots__ = ("deferred", "timed_out", "timeout")

    def __init__(self, deferred: Deferred[Any], timeout: float) -> None:
        self.deferred: Deferred[Any] | None = deferred
        self.timeout = timeout
        self.timed_out = False

    def settled(self, result: object) -> object:
        self.deferred = None
        if self.timed_out and isinstance(result, Failure):
            result.trap(CancelledError)
            raise TimeoutError(self.timeout, "Deferred")
        return result


class Deadlines:
    """Gives Deferreds timeouts on ``clock``."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, _Waiting]] = []
        self._order = itertools.count()  # same deadlines time out in the order they came
        self._call: IDelayedCall | None = None

    def add(self, deferred: Deferred[T], timeout: float) -> Deferred[T]:
        """Cancel ``deferred`` unless it fired within ``timeout`` seconds; ``deferred``.

        The timeout covers the callbacks added to it before, none added after.
        """
        heap = self._heap
        while heap and heap[0][2].deferred is None:
            heapq.heappop(heap)
        waiting = _Waiting(deferred, timeout)
        now = self._clock.seconds()
        heapq.heappush(heap, (now + timeout, next(self._order), waiting))
        self._arm(now + timeout, now)
        deferred.addBoth(waiting.settled)
        return deferred

    @property
    def pending(self) -> int:
        """Deferreds in the heap (some may have answered since the last ``add``)."""
        return len(self._heap)

    def _expire(self) -> None:
        self._call = None
        heap = self._heap
        now = self._clock.seconds()
        while heap and (heap[0][0] <= now or heap[0][2].deferred is None):
            _, _, waiting = heapq.heappop(heap)
            deferred = waiting.deferred
            if deferred is not None:
                waiting.timed_out = True
                try:
                    deferred.cancel()
                except Exception:
                    # A canceller that raised: the others still time out, as each of
                    # addTimeout's timed calls would.
                    _log.failure("cancelling a call at its deadline failed")
        if heap:
            # A cancellation's callbacks may have added a Deferred, and armed a call for it.
            self._arm(heap[0][0], now)

    def _arm(self, deadline: float, now: float) -> None:
        """Have the timed call come by ``deadline``."""
        call = self._call
        if call is None:
            self._call = self._clock.callLater(max(0.0, deadline - now), self._expire)
        elif deadline < call.getTime():
            call.reset(max(0.0, deadline - now))
