"""Retries with exponential backoff and full jitter, on the reactor's clock, never sleeping."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

T = TypeVar("T")


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] for attempt 0, 1, 2, ..."""
    return rand() * min(cap, base * (2**attempt))


@inlineCallbacks
def retry(
    attempt: Callable[[], Deferred[T]],
    *,
    attempts: int,
    base: float,
    cap: float,
    clock: IReactorTime,
    is_transient: Callable[[BaseException], bool],
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[int, float, BaseException], None] | None = None,
):  # type: ignore[no-untyped-def]
    """Call ``attempt`` until it succeeds, a failure is not transient, or attempts run out.

    Returns a Deferred firing with the first success or the last failure.
    """
    for n in range(attempts):
        try:
            result = yield attempt()
        except Exception as e:
            if n + 1 >= attempts or not is_transient(e):
                raise
            delay = backoff_delay(n, base, cap, rand)
            if on_retry is not None:
                on_retry(n + 1, delay, e)
            yield deferLater(clock, delay, lambda: None)
        else:
            return result
    raise AssertionError("unreachable")  # pragma: no cover
